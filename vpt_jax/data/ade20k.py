"""ADE20K (SceneParse150) for semantic segmentation: sources and SETR/mmseg tf.data pipelines.

Sources (both yield {'image': uint8 (H, W, 3), 'label': uint8 (H, W)} with the 150 classes as
1..150 and 0 = "other"):

* `folder_dataset(root, split)`: the official ADEChallengeData2016 layout,
  root/images/{training,validation}/NAME.jpg with root/annotations/{training,validation}/NAME.png
  (single-channel PNGs whose value is the class).
* `tfds_dataset(split)`: tensorflow-datasets' `scene_parse150` builder (features 'image' and
  'annotation', both 3-channel images; splits 'train' and 'test'). The label is channel
  `annotation_channel` (0). Beware: the builder in tensorflow_datasets 4.9 downloads
  ChallengeData2017's `annotations_instance` files, whose R channel is a category of the 2017
  instance track, not necessarily the 150 semantic classes of ADEChallengeData2016 that the paper
  (and SETR) score; for the paper's protocol use the official folder.

Labels follow mmseg's reduce_zero_label=True: 0 ("other") -> 255 (ignored), k -> k - 1, so the
150 classes are 0..149; any value above 150 in a source is an error naming that source.

Training augmentation (mmseg configs/_base_/datasets/ade20k.py, as SETR trains):
RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio) -> RandomCrop(512x512,
cat_max_ratio=0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion -> normalise -> Pad to 512
(image 0 after normalisation, label 255). Images are resized bilinearly, label maps with nearest
neighbours (never mixing class ids). Every random draw is a stateless op seeded by
(seed, example index), so a pipeline is a pure function of its seed.

* keep-ratio resize: the image is scaled by min(long_target / long_side, short_target /
  short_side) with (long, short)_target = ratio * (2048, 512), new side int(side * f + 0.5).
* category-max-ratio crop: up to 10 crops are drawn; the first in which more than one class is
  present and no class covers cat_max_ratio or more of the non-ignored pixels is kept; if all 10
  fail, one more crop is drawn and kept (mmseg's loop). A crop is min(512, side) on each axis.
* PhotoMetricDistortion: each with probability 1/2 and on the 0..255 scale: brightness + U(-32,
  32); contrast x U(0.5, 1.5) (a plain scaling, as mmseg, not around the mean); saturation x
  U(0.5, 1.5) in HSV; hue + an integer in [-18, 18] of OpenCV's 180-step hue circle; contrast
  goes first or last (probability 1/2). Values are clipped to [0, 255] after every step (mmseg
  also rounds to uint8 there; this pipeline stays in float).

Evaluation: the image resized keep-ratio to (2048, 512) (bilinear) and normalised; the label kept
at its original size (mmseg scores predictions resized back to the original resolution).

normalization: 'minus_one_one' (x / 127.5 - 1: what the project's ViT checkpoints expect, the
default) or 'imagenet' (mmseg's mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375)).
"""

from __future__ import annotations

import glob
import os
from typing import Dict, Sequence, Tuple

import tensorflow as tf

NUM_CLASSES = 150
IGNORE_INDEX = 255
SCALE = (2048, 512)
CROP = (512, 512)
RATIO_RANGE = (0.5, 2.0)
CAT_MAX_RATIO = 0.75
MMSEG_MEAN = (123.675, 116.28, 103.53)
MMSEG_STD = (58.395, 57.12, 57.375)
NORMALIZATIONS = ("minus_one_one", "imagenet")
FOLDER_SPLITS = {"train": "training", "training": "training", "val": "validation",
                 "validation": "validation"}

Example = Dict[str, tf.Tensor]


# -- sources --------------------------------------------------------------------------------------

def _check_raw_label(label: tf.Tensor, source: str) -> tf.Tensor:
  check = tf.debugging.assert_less_equal(
      tf.reduce_max(tf.cast(label, tf.int32)), NUM_CLASSES,
      message=f"{source}: an ADE20K label map holds a value above {NUM_CLASSES} (expected 0 = "
              f"other, 1..{NUM_CLASSES} = classes)")
  with tf.control_dependencies([check]):
    return tf.identity(label)


def folder_pairs(root: str, split: str) -> Tuple[list, list]:
  """Sorted (image paths, annotation paths) of one split of the ADEChallengeData2016 layout."""
  if split not in FOLDER_SPLITS:
    raise ValueError(f"ADE20K folder split {split!r}: expected one of {sorted(FOLDER_SPLITS)}")
  sub = FOLDER_SPLITS[split]
  image_dir = os.path.join(root, "images", sub)
  label_dir = os.path.join(root, "annotations", sub)
  for d in (image_dir, label_dir):
    if not os.path.isdir(d):
      raise FileNotFoundError(f"ADE20K folder {root!r}: missing directory {d!r} (expected the "
                              "ADEChallengeData2016 layout images/{training,validation}, "
                              "annotations/{training,validation})")
  images = sorted(glob.glob(os.path.join(image_dir, "*.jpg")))
  if not images:
    raise FileNotFoundError(f"ADE20K folder: no .jpg images in {image_dir!r}")
  labels = []
  for path in images:
    label = os.path.join(label_dir, os.path.splitext(os.path.basename(path))[0] + ".png")
    if not os.path.exists(label):
      raise FileNotFoundError(f"ADE20K folder: image {path!r} has no annotation {label!r}")
    labels.append(label)
  return images, labels


def folder_dataset(root: str, split: str) -> tf.data.Dataset:
  """Raw examples of the official ADEChallengeData2016 folder (in file-name order)."""
  images, labels = folder_pairs(root, split)
  source = f"ADE20K folder {root!r} split {split!r}"

  def load(image_path, label_path):
    image = tf.io.decode_jpeg(tf.io.read_file(image_path), channels=3)
    label = tf.io.decode_png(tf.io.read_file(label_path), channels=1)[..., 0]
    return {"image": image, "label": _check_raw_label(label, source)}
  return tf.data.Dataset.from_tensor_slices((images, labels)).map(
      load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def tfds_dataset(split: str, *, data_dir: str = "", name: str = "scene_parse150",
                 annotation_channel: int = 0) -> tf.data.Dataset:
  """Raw examples of tfds' scene_parse150 (splits 'train', 'test'); see the module docstring."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir or None, shuffle_files=False)
  except Exception as e:  # tfds raises several types for a dataset that is not prepared
    raise FileNotFoundError(f"tfds dataset {name!r} split {split!r} could not be loaded ({e}); "
                            f"prepare it with `tfds build {name}` or use the ADE20K folder") from e
  source = f"tfds {name!r} split {split!r}"

  def convert(ex):
    if "annotation" not in ex or "image" not in ex:
      raise ValueError(f"{source}: expected features 'image' and 'annotation', got {sorted(ex)}")
    ann = ex["annotation"]
    label = ann[..., annotation_channel] if ann.shape.rank == 3 else ann
    return {"image": ex["image"], "label": _check_raw_label(label, source)}
  return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def reduce_zero_label(label: tf.Tensor) -> tf.Tensor:
  """0 -> 255 (ignored), k -> k - 1 for 1..254, 255 stays 255; int32."""
  label = tf.cast(label, tf.int32)
  return tf.where((label == 0) | (label == IGNORE_INDEX), IGNORE_INDEX, label - 1)


# -- augmentation ---------------------------------------------------------------------------------

def _seed(seed: tf.Tensor, k: int) -> tf.Tensor:
  """A distinct stateless seed per augmentation step."""
  return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), k)


def _uniform(seed, lo, hi, dtype=tf.float32):
  return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi, dtype=dtype)


def _coin(seed, p: float = 0.5) -> tf.Tensor:
  return _uniform(seed, 0.0, 1.0) < p


def keep_ratio_size(shape: tf.Tensor, scale: Sequence[float], ratio=1.0) -> tf.Tensor:
  """(h, w) -> the keep-ratio size that fits ratio * `scale` (long, short targets; mmcv rescale)."""
  hw = tf.cast(shape, tf.float32)
  long_t, short_t = max(scale) * ratio, min(scale) * ratio
  f = tf.minimum(long_t / tf.reduce_max(hw), short_t / tf.reduce_min(hw))
  return tf.cast(hw * f + 0.5, tf.int32)


def resize_pair(image: tf.Tensor, label: tf.Tensor, size: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """Image bilinear (float), label nearest (never mixes class ids)."""
  image = tf.image.resize(tf.cast(image, tf.float32), size, "bilinear")
  label = tf.image.resize(label[..., None], size, "nearest")[..., 0]
  return image, tf.cast(label, tf.int32)


def random_resize(image, label, seed, *, scale=SCALE, ratio_range=RATIO_RANGE):
  ratio = _uniform(seed, ratio_range[0], ratio_range[1])
  size = keep_ratio_size(tf.shape(label)[:2], scale, ratio)
  return resize_pair(image, label, size)


def _crop_ok(label: tf.Tensor, cat_max_ratio: float) -> tf.Tensor:
  valid = tf.boolean_mask(label, label != IGNORE_INDEX)
  counts = tf.math.bincount(valid, minlength=IGNORE_INDEX + 1, dtype=tf.int32)
  present = tf.math.count_nonzero(counts)
  total = tf.cast(tf.reduce_sum(counts), tf.float32)
  return (present > 1) & (tf.cast(tf.reduce_max(counts), tf.float32) < cat_max_ratio * total)


def random_crop(image, label, seed, *, crop=CROP, cat_max_ratio=CAT_MAX_RATIO, tries=10):
  """mmseg RandomCrop with the category-max-ratio retry (see the module docstring)."""
  h, w = tf.shape(label)[0], tf.shape(label)[1]
  ch, cw = tf.minimum(crop[0], h), tf.minimum(crop[1], w)

  def offset(k):
    s = _seed(seed, 100 + k)
    y = tf.random.stateless_uniform([], s, 0, h - ch + 1, dtype=tf.int32)
    x = tf.random.stateless_uniform([], _seed(s, 1), 0, w - cw + 1, dtype=tf.int32)
    return tf.stack([y, x])

  cut = lambda a, o: a[o[0]:o[0] + ch, o[1]:o[1] + cw]
  if cat_max_ratio < 1.0:
    def cond(k, o):
      return (k < tries) & tf.logical_not(_crop_ok(cut(label, o), cat_max_ratio))
    _, off = tf.while_loop(cond, lambda k, o: (k + 1, offset(k + 1)), (0, offset(0)))
  else:
    off = offset(0)
  return cut(image, off), cut(label, off)


def random_flip(image, label, seed, prob: float = 0.5):
  flip = _coin(seed, prob)
  return (tf.cond(flip, lambda: image[:, ::-1], lambda: image),
          tf.cond(flip, lambda: label[:, ::-1], lambda: label))


def photometric_distortion(image: tf.Tensor, seed: tf.Tensor, *, brightness_delta: float = 32.0,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5),
                           hue_delta: int = 18) -> tf.Tensor:
  """mmseg PhotoMetricDistortion on a float RGB image in [0, 255] (see the module docstring)."""
  clip = lambda x: tf.clip_by_value(x, 0.0, 255.0)
  s = lambda k: _seed(seed, 200 + k)
  maybe = lambda k, f, x: tf.cond(_coin(s(k)), lambda: f(x), lambda: x)

  def contrast(x):
    return maybe(2, lambda y: clip(y * _uniform(s(3), *contrast_range)), x)

  x = maybe(0, lambda y: clip(y + _uniform(s(1), -brightness_delta, brightness_delta)), image)
  contrast_first = _coin(s(4))
  x = tf.cond(contrast_first, lambda: contrast(x), lambda: x)
  x = maybe(5, lambda y: clip(255.0 * tf.image.adjust_saturation(
      y / 255.0, _uniform(s(6), *saturation_range))), x)
  hue = lambda y: clip(255.0 * tf.image.adjust_hue(
      y / 255.0, tf.cast(_uniform(s(8), -hue_delta, hue_delta + 1, tf.int32), tf.float32) / 180.0))
  x = maybe(7, hue, x)
  return tf.cond(contrast_first, lambda: x, lambda: contrast(x))


def normalize(image: tf.Tensor, normalization: str = "minus_one_one") -> tf.Tensor:
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"ADE20K normalization={normalization!r}: expected one of {NORMALIZATIONS}")
  image = tf.cast(image, tf.float32)
  if normalization == "minus_one_one":
    return image / 127.5 - 1.0
  return (image - MMSEG_MEAN) / MMSEG_STD


def pad_to(image, label, size=CROP):
  """Pad bottom/right to `size`: image with 0 (after normalisation), label with 255."""
  h, w = tf.shape(label)[0], tf.shape(label)[1]
  pads = [[0, tf.maximum(size[0] - h, 0)], [0, tf.maximum(size[1] - w, 0)]]
  image = tf.pad(image, pads + [[0, 0]], constant_values=0.0)
  label = tf.pad(label, pads, constant_values=IGNORE_INDEX)
  image = tf.ensure_shape(image, (size[0], size[1], 3))
  return image, tf.ensure_shape(label, tuple(size))


def train_example(image, label, seed, *, crop=CROP, scale=SCALE, ratio_range=RATIO_RANGE,
                  cat_max_ratio=CAT_MAX_RATIO, flip_prob=0.5, photometric=True,
                  normalization="minus_one_one") -> Example:
  """One training example from a raw (uint8 image, reduced int32 label) pair."""
  image, label = random_resize(image, label, _seed(seed, 0), scale=scale, ratio_range=ratio_range)
  image, label = random_crop(image, label, _seed(seed, 1), crop=crop, cat_max_ratio=cat_max_ratio)
  image, label = random_flip(image, label, _seed(seed, 2), flip_prob)
  if photometric:
    image = photometric_distortion(image, _seed(seed, 3))
  image, label = pad_to(normalize(image, normalization), label, crop)
  return {"image": image, "label": label}


def train_dataset(raw: tf.data.Dataset, *, batch_size: int, seed: int, shuffle_buffer: int = 1024,
                  **augment) -> tf.data.Dataset:
  """Endless batches of augmented (image (B, 512, 512, 3), label (B, 512, 512)) examples.

  Example k of the repeated, shuffled stream is augmented with seed (seed, k).
  """
  def aug(k, ex):
    s = tf.stack([tf.constant(seed, tf.int64), k])
    return train_example(ex["image"], reduce_zero_label(ex["label"]), s, **augment)
  ds = raw.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).repeat()
  ds = ds.enumerate().map(aug, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_example(image, label, *, scale=SCALE, normalization="minus_one_one") -> Example:
  """Test-scale image (keep-ratio resize to `scale`) and the original-size reduced label."""
  label = reduce_zero_label(label)
  size = keep_ratio_size(tf.shape(label)[:2], scale)
  image = tf.image.resize(tf.cast(image, tf.float32), size, "bilinear")
  return {"image": normalize(image, normalization), "label": label}


def eval_dataset(raw: tf.data.Dataset, **kw) -> tf.data.Dataset:
  """One pass, unbatched (images differ in size): {'image' float (h, w, 3), 'label' (H, W)}."""
  return raw.map(lambda ex: eval_example(ex["image"], ex["label"], **kw),
                 num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
