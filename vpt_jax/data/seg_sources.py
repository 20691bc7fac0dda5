"""Where a segmentation run's images and label maps come from: ADE20K (tfds or the official
folder) or the offline procedural shapes masks.

`train_batches(cfg, ...)` yields numpy batches {'image' (B, H, W, 3) float32, 'label' (B, H, W)
int32} from any step on (a resumed run continues the same stream); `eval_examples(cfg)` yields
single test examples {'image' at test scale, 'label' at the original size}. Labels use 255 for
ignored pixels (ADE20K's "other", reduce-zero-label); the shapes task has none (class 0 is the
background, a real class).
"""

from __future__ import annotations

from typing import Dict, Iterator

import ml_collections
import numpy as np

from vpt_jax.data import ade20k, shapes

SOURCES = ("shapes", "ade20k_tfds", "ade20k_folder")
SHAPES_TEST_SEED = 20_000   # the demo backbone's pretraining used seeds < 20 000


def default_config() -> ml_collections.ConfigDict:
  """The `data` section of a segmentation config.

  source: 'shapes' (offline: `shapes.make_shape_masks`, background + 14 shape classes),
    'ade20k_tfds' (tfds scene_parse150: splits 'train', 'test' = the 2000 validation images) or
    'ade20k_folder' (ADEChallengeData2016 under `root`: splits 'training', 'validation').
  num_train, num_test, tiles, seed: the shapes task (tiles=k: k x k shapes per image).
  crop, scale, ratio_range, cat_max_ratio, photometric: ADE20K training augmentation (mmseg's);
    `scale` is also the test scale (keep-ratio resize).
  normalization: 'minus_one_one' (the ViT checkpoints' range) or 'imagenet' (mmseg's mean/std).
  max_eval_images: evaluate on the first k test images only (0 = all).
  """
  return ml_collections.ConfigDict(dict(
      source="shapes", root="", data_dir="", name="scene_parse150",
      train_split="train", test_split="test", num_classes=0,
      num_train=2000, num_test=300, tiles=1, seed=0,
      crop=512, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, photometric=True,
      normalization="minus_one_one", shuffle_buffer=1024, max_eval_images=0))


def check(cfg: ml_collections.ConfigDict) -> None:
  if cfg.source not in SOURCES:
    raise ValueError(f"config data.source={cfg.source!r}: expected one of {SOURCES}")
  if cfg.normalization not in ade20k.NORMALIZATIONS:
    raise ValueError(f"config data.normalization={cfg.normalization!r}: expected one of "
                     f"{ade20k.NORMALIZATIONS}")
  if cfg.source == "ade20k_folder" and not cfg.root:
    raise ValueError("config data.root is empty: data.source='ade20k_folder' needs the "
                     "ADEChallengeData2016 directory")
  if cfg.source == "shapes" and (cfg.num_train < 1 or cfg.num_test < 1):
    raise ValueError(f"config data.num_train={cfg.num_train} / data.num_test={cfg.num_test} "
                     "must be >= 1")


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  if cfg.num_classes:
    return int(cfg.num_classes)
  return len(shapes.SHAPE_CLASSES) + 1 if cfg.source == "shapes" else ade20k.NUM_CLASSES


def _shapes(cfg, split: str, image_size: int):
  n, seed = ((cfg.num_train, 10_000 * (cfg.seed + 3)) if split == "train"
             else (cfg.num_test, SHAPES_TEST_SEED + cfg.seed))
  images, masks = shapes.make_shape_masks(n, seed, image_size, tiles=cfg.tiles)
  return images.astype(np.float32) / 127.5 - 1.0, masks


def _raw(cfg, split: str):
  if cfg.source == "ade20k_tfds":
    return ade20k.tfds_dataset(split, data_dir=cfg.data_dir, name=cfg.name)
  return ade20k.folder_dataset(cfg.root, split)


def steps_per_epoch(cfg: ml_collections.ConfigDict, batch_size: int) -> int:
  """Batches per pass over the shapes training set (ADE20K streams: 0, iteration-based)."""
  return cfg.num_train // batch_size if cfg.source == "shapes" else 0


def train_batches(cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int, image_size: int,
                  start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Endless training batches from step `start_step` on (the same stream as from step 0)."""
  check(cfg)
  if cfg.source == "shapes":
    images, masks = _shapes(cfg, "train", image_size)
    spe = len(masks) // batch_size
    if spe == 0:
      raise ValueError(f"config batch_size={batch_size} is larger than data.num_train="
                       f"{len(masks)}")
    step = start_step
    while True:
      epoch, k = divmod(step, spe)
      order = np.random.default_rng([seed, epoch]).permutation(len(masks))
      idx = order[k * batch_size:(k + 1) * batch_size]
      yield {"image": images[idx], "label": masks[idx]}
      step += 1
  crop = (cfg.crop, cfg.crop)
  ds = ade20k.train_dataset(
      _raw(cfg, cfg.train_split), batch_size=batch_size, seed=seed,
      shuffle_buffer=cfg.shuffle_buffer, crop=crop, scale=tuple(cfg.scale),
      ratio_range=tuple(cfg.ratio_range), cat_max_ratio=cfg.cat_max_ratio,
      photometric=cfg.photometric, normalization=cfg.normalization)
  yield from ds.skip(start_step).as_numpy_iterator()


def eval_examples(cfg: ml_collections.ConfigDict, *, image_size: int
                  ) -> Iterator[Dict[str, np.ndarray]]:
  """Test examples one by one (ADE20K images differ in size)."""
  check(cfg)
  limit = cfg.max_eval_images or None
  if cfg.source == "shapes":
    images, masks = _shapes(cfg, "test", image_size)
    for image, mask in list(zip(images, masks))[:limit]:
      yield {"image": image, "label": mask}
    return
  ds = ade20k.eval_dataset(_raw(cfg, cfg.test_split), scale=tuple(cfg.scale),
                           normalization=cfg.normalization)
  if limit:
    ds = ds.take(limit)
  yield from ds.as_numpy_iterator()
