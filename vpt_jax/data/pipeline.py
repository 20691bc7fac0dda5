"""tf.data pipelines over in-memory splits, in an order that is a function of (seed, step).

Training: epoch e visits the examples in `permutation(seed, e)`; batch b of the run is
fixed by its global step, and random augmentation draws from stateless ops seeded by
(seed, global example position). Restarting at step s therefore replays exactly the batches an
uninterrupted run would have seen from s on. Decoding and resizing run in parallel in tf.data;
batches are prefetched. With several hosts, each one produces only its rows of every global batch.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Dict, Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from vpt_jax.data.split import Split, eval_order, train_order

# Debug: with this variable set to a directory, each process appends the example indices of its
# rows of every training batch to <dir>/rows.<process_index>.jsonl (the multi-process test reads
# them to prove that the hosts' rows are disjoint and make up the global batch).
ROWS_LOG_ENV = "VPT_JAX_LOG_ROWS"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("resize", "resize_crop")
NORMALIZATIONS = ("minus_one_one", "imagenet")


def _graph_as_written(fn: Callable) -> Callable:
  """Marks a tf.data map function as needing no AutoGraph rewrite: its Python branches are on
  the config and static shapes only, never on tensor values. AutoGraph's source transformation
  would otherwise run on every pipeline a run builds (about a second of CPU per run here)."""
  return tf.autograph.experimental.do_not_convert(fn)


def make_preprocess(cfg: ml_collections.ConfigDict, image_size: int, train: bool) -> Callable:
  """(image uint8 or encoded bytes, seed (2,) int) -> float32 (S, S, 3) model input."""
  if cfg.crop not in CROPS:
    raise ValueError(f"config data.crop={cfg.crop!r}: expected one of {CROPS}")
  if cfg.normalization not in NORMALIZATIONS:
    raise ValueError(f"config data.normalization={cfg.normalization!r}: expected one of "
                     f"{NORMALIZATIONS}")
  if cfg.crop == "resize_crop" and cfg.resize_size < image_size:
    raise ValueError(f"config data.resize_size={cfg.resize_size} is smaller than the crop "
                     f"{image_size}")

  def preprocess(image, seed):
    if image.dtype == tf.string:
      image = tf.io.decode_image(image, channels=3, expand_animations=False)
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    image = tf.cast(image, tf.float32)
    scale = cfg.get("pixel_scale", 1)
    if scale != 1:
      image = image * float(scale)  # dSprites' {0, 1} pixels -> {0, 255}, as VTAB does
    if cfg.crop == "resize":
      image = tf.image.resize(image, (image_size, image_size), "bilinear")
    else:
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = cfg.resize_size / tf.reduce_min(shape)
      new = tf.cast(tf.round(shape * scale), tf.int32)
      image = tf.image.resize(image, new, "bilinear")
      if train:
        image = tf.image.stateless_random_crop(image, (image_size, image_size, 3), seed)
        image = tf.image.stateless_random_flip_left_right(image, seed + 1)
      else:
        top = (new[0] - image_size) // 2
        left = (new[1] - image_size) // 2
        image = image[top:top + image_size, left:left + image_size]
    image = tf.clip_by_value(image, 0.0, 255.0)
    if cfg.normalization == "minus_one_one":
      return image / 127.5 - 1.0
    return (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  # Without random augmentation the result depends on the image alone: it can be cached.
  preprocess.deterministic = cfg.crop == "resize" or not train
  return preprocess


class Pipeline:
  """Batches of one split: `train_batches(start_step)` (endless) or `eval_batches()` (one pass).

  batch_size is the global batch; this process yields rows
  [process_index * local, (process_index + 1) * local) of each global batch.
  """

  def __init__(self, split: Split, preprocess: Callable, *, batch_size: int, seed: int,
               process_index: int = 0, process_count: int = 1, cache_bytes: int = 2 << 30):
    if batch_size % process_count:
      raise ValueError(f"batch size {batch_size} is not divisible by {process_count} hosts")
    self.split = split
    self.preprocess = preprocess
    self.batch_size = batch_size
    self.local = batch_size // process_count
    self.offset = process_index * self.local
    self.process_index = process_index
    self.seed = seed
    self._images = tf.constant(split.images) if not split.encoded else tf.constant(
        list(split.images), tf.string)
    self._labels = tf.constant(split.labels, tf.int32)
    self._cached = None
    if getattr(preprocess, "deterministic", False):
      self._cache(cache_bytes)

  def _cache(self, limit: int) -> None:
    """Decodes and preprocesses every image once (in parallel) when the result fits in `limit`.

    For VTAB's no-augmentation preprocessing this removes all per-epoch decoding; the cached
    arrays are exactly what the uncached path computes.
    """
    first = self.preprocess(self._images[0], tf.zeros(2, tf.int64))
    if len(self.split) * int(np.prod(first.shape)) * 4 > limit:
      return
    ds = tf.data.Dataset.from_tensor_slices(self._images).map(
        _graph_as_written(lambda im: self.preprocess(im, tf.zeros(2, tf.int64))),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(256)
    self._cached = tf.concat(list(ds), axis=0)

  @property
  def steps_per_epoch(self) -> int:
    """ceil(n / batch): every example each epoch, the last batch padded and masked."""
    return -(-len(self.split) // self.batch_size)

  def _dataset(self, index: np.ndarray, positions: np.ndarray, mask: np.ndarray) -> tf.data.Dataset:
    images, labels, seed = self._images, self._labels, self.seed

    cached = self._cached

    def load(i, pos, m):
      s = tf.stack([tf.constant(seed, tf.int64), tf.cast(pos, tf.int64)])
      return {"image": self.preprocess(tf.gather(images, i), s), "label": tf.gather(labels, i),
              "mask": m}
    ds = tf.data.Dataset.from_tensor_slices((index, positions, mask))
    if cached is not None:  # batch the indices, then gather whole preprocessed batches
      ds = ds.batch(self.local, drop_remainder=True).map(_graph_as_written(
          lambda i, pos, m: {"image": tf.gather(cached, i), "label": tf.gather(labels, i),
                             "mask": m}))
      return ds.prefetch(tf.data.AUTOTUNE)
    ds = ds.map(_graph_as_written(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(self.local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

  def _local_rows(self, a: np.ndarray) -> np.ndarray:
    """Rows of a (steps * global batch) array that belong to this process, in order."""
    a = a.reshape(-1, self.batch_size)[:, self.offset:self.offset + self.local]
    return a.reshape(-1)

  def epoch_order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.split))

  def train_batches(self, start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    """Endless training batches from `start_step`; each carries 'mask' (0 on the padding rows of
    an epoch's last batch, which the train step leaves out of the loss)."""
    spe = self.steps_per_epoch
    if spe == 0:
      raise ValueError("the training split is empty")
    epoch, skip = divmod(start_step, spe)
    b = self.batch_size
    while True:
      order, mask = train_order(self.epoch_order(epoch), b)
      positions = epoch * len(self.split) + np.arange(len(order))
      sl = slice(skip * b, spe * b)
      self._log_rows(epoch * spe + skip, self._local_rows(order[sl]))
      ds = self._dataset(self._local_rows(order[sl]), self._local_rows(positions[sl]),
                         self._local_rows(mask[sl]))
      yield from ds.as_numpy_iterator()
      epoch, skip = epoch + 1, 0

  def _log_rows(self, first_step: int, rows: np.ndarray) -> None:
    """Appends {step: this process's example indices} per step (only with ROWS_LOG_ENV set)."""
    where = os.environ.get(ROWS_LOG_ENV)
    if not where:
      return
    os.makedirs(where, exist_ok=True)
    with open(os.path.join(where, f"rows.{self.process_index}.jsonl"), "a") as f:
      for i, r in enumerate(rows.reshape(-1, self.local)):
        f.write(json.dumps({"step": first_step + i, "rows": r.tolist()}) + "\n")

  def eval_batches(self) -> Iterator[Dict[str, np.ndarray]]:
    """One pass in order; the last global batch is padded and carries mask 0 on the padding."""
    index, mask = eval_order(len(self.split), self.batch_size)
    ds = self._dataset(self._local_rows(index), self._local_rows(np.arange(len(index))),
                       self._local_rows(mask))
    yield from ds.as_numpy_iterator()
