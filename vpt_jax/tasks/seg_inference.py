"""Whole-image segmentation inference: sliding window, multi-scale and flip, as mmseg tests it.

Sliding window (mmseg `EncoderDecoder.slide_inference`, SETR ADE20K test_cfg mode='slide',
crop 512, stride 341): windows of the crop size every `stride` pixels, the last one in each
direction moved back to end at the image border; the logits of overlapping windows are averaged
with a count map. A ViT here has a fixed input size, so an image smaller than the crop is first
padded at the bottom/right with `pad_value` (0: the mean colour of [-1, 1] inputs, and what mmseg
pads normalised images with) and the logits cut back; mmseg instead runs such a crop at its own
size with interpolated position embeddings.

Multi-scale + flip (mmseg's ADE20K `img_ratios` (0.5, 0.75, 1.0, 1.25, 1.5, 1.75) with flip): the
(already test-resized) image is resized by each ratio (size int(s * r + 0.5), bilinear), run by the
sliding window, flipped back, its logits resized to the output size, and the softmax probabilities
averaged over all scales and flips (mmseg 0.x `aug_test`). The predicted class is their argmax.

`predict_fn` maps a (n, crop_h, crop_w, 3) batch to (n, h, w, num_classes) logits (any h, w: they
are resized to the crop); windows are sent in batches of exactly `batch_size` (the last one padded)
so a jitted predict_fn compiles once.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.tasks.seg_metrics import confusion_matrix
from vpt_jax.tasks.segmentation import resize_bilinear

PredictFn = Callable[[np.ndarray], np.ndarray]
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def window_starts(size: int, crop: int, stride: int) -> List[int]:
  """Start offsets of the windows along one axis (mmseg's grid: the last one ends at `size`)."""
  if crop < 1 or stride < 1:
    raise ValueError(f"crop {crop} and stride {stride} must be positive")
  if stride > crop:
    raise ValueError(f"stride {stride} > crop {crop} would leave pixels uncovered")
  grids = max(size - crop + stride - 1, 0) // stride + 1
  return [max(min(i * stride + crop, size) - crop, 0) for i in range(grids)]


def _resize(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """(H, W, C) bilinear (align_corners=False, no antialiasing) to `size`."""
  if tuple(x.shape[:2]) == tuple(size):
    return x
  return np.asarray(resize_bilinear(jnp.asarray(x)[None], size)[0])


def slide_inference(predict_fn: PredictFn, image: np.ndarray, *, crop: Sequence[int],
                    stride: Sequence[int], batch_size: int = 1,
                    pad_value: float = 0.0) -> np.ndarray:
  """(H, W, 3) image -> (H, W, C) logits averaged over the sliding windows that cover each pixel."""
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise ValueError(f"slide_inference takes one (H, W, C) image, got shape {image.shape}")
  (ch, cw), (sh, sw) = crop, stride
  h, w = image.shape[:2]
  hp, wp = max(h, ch), max(w, cw)
  if (hp, wp) != (h, w):
    image = np.pad(image, ((0, hp - h), (0, wp - w), (0, 0)), constant_values=pad_value)
  boxes = [(y, x) for y in window_starts(hp, ch, sh) for x in window_starts(wp, cw, sw)]
  total: Optional[np.ndarray] = None
  count = np.zeros((hp, wp, 1), np.float32)
  for lo in range(0, len(boxes), batch_size):
    chunk = boxes[lo:lo + batch_size]
    crops = np.zeros((batch_size, ch, cw, image.shape[2]), np.float32)
    for k, (y, x) in enumerate(chunk):
      crops[k] = image[y:y + ch, x:x + cw]
    logits = np.asarray(predict_fn(crops), np.float32)
    if logits.ndim != 4 or logits.shape[0] != batch_size:
      raise ValueError(f"predict_fn returned shape {logits.shape} for a batch of {batch_size} "
                       "crops; expected (batch, h, w, classes)")
    if total is None:
      total = np.zeros((hp, wp, logits.shape[-1]), np.float32)
    for k, (y, x) in enumerate(chunk):
      total[y:y + ch, x:x + cw] += _resize(logits[k], (ch, cw))
      count[y:y + ch, x:x + cw] += 1
  assert total is not None and (count > 0).all()
  return (total / count)[:h, :w]


def softmax(x: np.ndarray) -> np.ndarray:
  return np.asarray(jax.nn.softmax(jnp.asarray(x), axis=-1))


def multi_scale_inference(predict_fn: PredictFn, image: np.ndarray, *, crop: Sequence[int],
                          stride: Sequence[int], scales: Sequence[float] = (1.0,),
                          flip: bool = False, out_size: Optional[Sequence[int]] = None,
                          batch_size: int = 1, pad_value: float = 0.0) -> np.ndarray:
  """(H, W, 3) image -> (out_h, out_w, C) class probabilities averaged over scales and flips.

  out_size defaults to the image size; pass the original label size to score at the dataset's
  resolution (mmseg resizes the logits back to the original image before the metric).
  scales=(1.0,), flip=False is single-scale inference (the softmax of the sliding-window logits).
  """
  image = np.asarray(image, np.float32)
  h, w = image.shape[:2]
  out = tuple(out_size) if out_size is not None else (h, w)
  if not scales or any(r <= 0 for r in scales):
    raise ValueError(f"scales {tuple(scales)} must be a non-empty list of positive ratios")
  probs, n = None, 0
  for r in scales:
    scaled = _resize(image, (int(h * r + 0.5), int(w * r + 0.5)))
    for flipped in ((False, True) if flip else (False,)):
      x = scaled[:, ::-1] if flipped else scaled
      logits = slide_inference(predict_fn, x, crop=crop, stride=stride, batch_size=batch_size,
                               pad_value=pad_value)
      if flipped:
        logits = logits[:, ::-1]
      p = softmax(_resize(np.ascontiguousarray(logits), out))
      probs = p if probs is None else probs + p
      n += 1
  return probs / n


def make_predict_fn(segmenter, backbone_vars, head_vars) -> PredictFn:
  """A jitted crops -> decode-head logits function (evaluation mode) for the sliding window."""
  fn = jax.jit(lambda x: segmenter.apply(backbone_vars, head_vars, x)[0])
  return lambda crops: np.asarray(fn(jnp.asarray(crops)))


def evaluate(predict_fn: PredictFn, examples, num_classes: int, *, crop: Sequence[int],
             stride: Sequence[int], scales: Sequence[float] = (1.0,), flip: bool = False,
             batch_size: int = 1, ignore_index: int = 255) -> Tuple[np.ndarray, int]:
  """Accumulated confusion matrix over `examples` (iterable of {'image' (h, w, 3) at test scale,
  'label' (H, W) at the original size}); predictions are scored at the label's size.

  Returns (confusion matrix (num_classes, num_classes) int64, number of images).
  """
  total = np.zeros((num_classes, num_classes), np.int64)
  n = 0
  for ex in examples:
    label = np.asarray(ex["label"])
    probs = multi_scale_inference(predict_fn, ex["image"], crop=crop, stride=stride,
                                  scales=scales, flip=flip, out_size=label.shape,
                                  batch_size=batch_size)
    if probs.shape[-1] != num_classes:
      raise ValueError(f"the model predicts {probs.shape[-1]} classes; num_classes={num_classes}")
    total += np.asarray(confusion_matrix(jnp.asarray(probs.argmax(-1)), jnp.asarray(label),
                                         num_classes, ignore_index=ignore_index), np.int64)
    n += 1
  return total, n
