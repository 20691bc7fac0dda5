"""A tuned segmentation run's predictions next to the ground truth (`python -m vpt_jax.plots seg`).

One row per test image: the input, the ground-truth label map and the prediction (single-scale
sliding window, as the run's `mIoU_ss`), classes coloured by one fixed palette; ignored pixels
(255) are black.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from vpt_jax.analysis import plots
from vpt_jax.data import seg_sources
from vpt_jax.tasks import seg_inference
from vpt_jax.tuning import seg_loop


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
  """(num_classes + 1, 3) colours in [0, 1]: class 0 grey, the others random but fixed; the last
  row (black) is for ignored pixels."""
  rng = np.random.default_rng(seed)
  colours = rng.uniform(0.15, 1.0, (num_classes, 3))
  colours[0] = 0.5
  return np.concatenate([colours, np.zeros((1, 3))])


def colour(label: np.ndarray, num_classes: int) -> np.ndarray:
  idx = np.where((label >= 0) & (label < num_classes), label, num_classes)
  return palette(num_classes)[idx]


def predictions(workdir: str, num_images: int) -> Tuple[list, int]:
  """[(image, label, prediction)] for the first `num_images` test images, and the class count."""
  tuned = seg_loop.load_tuned(workdir)
  config = tuned.config
  size = tuned.segmenter.backbone.image_size[0]
  predict = seg_inference.make_predict_fn(tuned.segmenter, tuned.backbone_vars, tuned.head_vars)
  stride = min(config.seg.stride, size)
  out = []
  for ex in seg_sources.eval_examples(config.data, image_size=size):
    if len(out) == num_images:
      break
    probs = seg_inference.multi_scale_inference(predict, ex["image"], crop=(size, size),
                                                stride=(stride, stride), scales=(1.0,),
                                                out_size=np.shape(ex["label"]))
    out.append((np.asarray(ex["image"]), np.asarray(ex["label"]), probs.argmax(-1)))
  return out, config.model.num_classes


def seg_figure(workdir: str, out: str, *, num_images: int = 4) -> str:
  """Writes the PNG; returns its path."""
  if num_images < 1:
    raise ValueError(f"num_images={num_images} must be >= 1")
  rows, n_cls = predictions(workdir, num_images)
  plt = plots._pyplot()  # pylint: disable=protected-access
  fig, axes = plt.subplots(len(rows), 3, figsize=(6, 2 * len(rows)), squeeze=False)
  for r, (image, label, pred) in enumerate(rows):
    plots._show_image(axes[r, 0], image)  # pylint: disable=protected-access
    for c, (m, title) in enumerate(((label, "ground truth"), (pred, "prediction")), start=1):
      axes[r, c].imshow(colour(m, n_cls), interpolation="nearest")
      axes[r, c].set_xticks([])
      axes[r, c].set_yticks([])
      if r == 0:
        axes[r, c].set_title(title)
    if r == 0:
      axes[r, 0].set_title("input")
  fig.tight_layout()
  return plots._save(fig, out)  # pylint: disable=protected-access
