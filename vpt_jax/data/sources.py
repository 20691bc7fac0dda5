"""Where examples come from: each source returns whole splits held in memory.

The transfer sets VPT is run on are small (VTAB-1k: 1000 training images; FGVC: a few thousand),
so splits are read once into memory, images kept encoded (bytes) or as uint8 arrays; the tf.data
pipeline (`vpt_jax.data.pipeline`) decodes, resizes and batches them in an order that is a pure
function of (seed, step), which is what makes an interrupted run resume bit for bit.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from typing import Dict, Sequence

import ml_collections
import numpy as np

from vpt_jax.data import folders, vtab
from vpt_jax.data.split import Split

# The 1797 scikit-learn digits split in the spirit of VTAB-1k: a fixed permutation, the first 1000
# for training (800 train + 200 validation), the remaining 797 for test.
DIGITS_SPLITS = {"train800": (0, 800), "val200": (800, 1000), "train800val200": (0, 1000),
                 "test": (1000, None)}


def default_config() -> ml_collections.ConfigDict:
  """The `data` section of a config.

  source: 'digits' (scikit-learn's handwritten digits, shipped with scikit-learn: offline),
    'tfds' (a tensorflow-datasets builder), or image files under `root`:
    'vtab_folder' (pre-extracted VTAB-1k: list files train800.txt / val200.txt /
    train800val200.txt / test.txt of "relative/path label" lines), 'fgvc_json' (VPT's FGVC
    layout: train.json / val.json / test.json mapping image path -> label, images under
    root/image_dir; no val.json: a seeded 90/10 cut of train), 'folder' (root/class_name/*.jpg,
    or root/{train,val,test}/class_name/*.jpg; otherwise a seeded per-class cut by val_fraction
    and test_fraction). Split names: digits and vtab_folder train800, val200, train800val200,
    test; fgvc_json and folder train, val, test.
  name, data_dir: the tfds builder (with version, e.g. 'cifar100:3.*.*') and its data directory
    ('' = tfds' default, ~/tensorflow_datasets).
  train_split, val_split, test_split: split names (digits: train800, val200, train800val200,
    test, each optionally sliced like a tfds split string: train800[:256]) or tfds split
    strings (e.g. 'train[:800]').
  num_classes: 0 = read from the source.
  image_key, label_key: feature names in the tfds examples.
  label_transform: '' (use label_key as it is) or a derived label of a VTAB structured task
    (`vpt_jax.data.vtab.LABEL_TRANSFORMS`: clevr_count, clevr_distance, kitti_distance,
    dsprites_location, dsprites_orientation).
  crop: 'resize' (straight to image_size, no augmentation: VTAB) or 'resize_crop' (shorter side
    to resize_size, random crop + flip for training, central crop for evaluation: FGVC).
  pixel_scale: decoded pixels are multiplied by this before anything else (a VTAB task's
    `pixel_scale`: 255 for dSprites, whose tfds images hold {0, 1}; 1 elsewhere).
  normalization: 'minus_one_one' (the range the ViT checkpoints were trained on) or 'imagenet'
    (mean/std, what the official VPT code fed them).
  percentage: fgvc_json only: < 1 trains on the official few-shot subset train_{percentage}.json
    (e.g. 0.1 -> train_0.1.json), as the VPT code's DATA.PERCENTAGE.
  on_bad_image: image files that are not JPEG/PNG/GIF/BMP: 'fail' (name the file) or 'skip'
    (drop them with one warning that counts them).
  val_split='holdout': the validation set is a seeded random `holdout_fraction` of train_split,
    which then keeps the rest (for datasets published without a validation split; the VPT paper
    holds out 10% of FGVC training sets).
  """
  return ml_collections.ConfigDict(dict(
      source="digits", name="", data_dir="", train_split="train800", val_split="val200",
      test_split="test", num_classes=0, image_key="image", label_key="label", label_transform="",
      crop="resize", resize_size=256, pixel_scale=1, normalization="minus_one_one", root="",
      image_dir="", percentage=1.0,
      on_bad_image="fail", val_fraction=0.1, test_fraction=0.0, holdout_fraction=0.1,
      holdout_seed=0))


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits (1797 8x8 images, values 0-16) read from the file scikit-learn ships.

  Read directly, without importing scikit-learn: `sklearn.datasets.load_digits` parses the same
  file, but importing scikit-learn costs ~1.3 s of CPU per process (the tests start dozens of
  training processes on the demo).
  """
  spec = importlib.util.find_spec("sklearn")
  if spec is None or not spec.submodule_search_locations:
    raise ModuleNotFoundError("the digits demo data is read from scikit-learn's package data: "
                              "pip install scikit-learn")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
  data = np.loadtxt(path, delimiter=",")
  return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


_SLICE = re.compile(r"^(\w+)(?:\[(\d*):(\d*)\]|)$")


def _digits(split: str) -> Split:
  """A digits split by name, optionally sliced as tfds split strings are (`train800[:256]`: its
  first 256 examples; quick runs and smoke tests on a subset, the order unchanged)."""
  m = _SLICE.match(split)
  if not m or m.group(1) not in DIGITS_SPLITS:
    raise ValueError(f"config data split {split!r}: the digits source has "
                     f"{', '.join(DIGITS_SPLITS)}, each optionally sliced as name[a:b]")
  images, target = _digits_arrays()
  order = np.random.default_rng(0).permutation(len(target))
  lo, hi = DIGITS_SPLITS[m.group(1)]
  idx = order[lo:hi][slice(*(int(x) if x else None for x in m.group(2, 3)))]
  images = np.round(images[idx] * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (n, 8, 8, 1)
  return Split(images, target[idx].astype(np.int32))


def _tfds(cfg: ml_collections.ConfigDict, split: str) -> Split:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  transform = vtab.label_transform(cfg.label_transform)
  data_dir = cfg.data_dir or None
  try:
    ds = tfds.load(cfg.name, split=split, data_dir=data_dir, download=False,
                   decoders={cfg.image_key: tfds.decode.SkipDecoding()})
  except Exception as e:  # tfds raises several types for a missing dataset or split.
    where = data_dir or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    raise FileNotFoundError(
        f"config data.name={cfg.name!r} split {split!r}: not available in {where} "
        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Prepare it first, "
        f"e.g. `tfds build {cfg.name.split(':')[0]}`"
        " (some datasets need a manual download), or set config.data.data_dir") from e
  images, labels = [], []
  for ex in tfds.as_numpy(ds):
    images.append(ex[cfg.image_key])
    labels.append(transform(ex) if transform else ex[cfg.label_key])
  if not labels:
    raise ValueError(f"config data.name={cfg.name!r} split {split!r} is empty")
  bad = [i for i, im in enumerate(images) if not folders.is_image(im)]
  if bad:
    where = f"config data.name={cfg.name!r} split {split!r}"
    if cfg.on_bad_image != "skip":
      raise ValueError(f"{where}: example {bad[0]} is not a JPEG/PNG/GIF/BMP image ({len(bad)} "
                       "such); set data.on_bad_image='skip' to drop them")
    warnings.warn(f"{where}: skipped {len(bad)} unreadable image(s), examples {bad[:5]}")
    keep = sorted(set(range(len(images))) - set(bad))
    images, labels = [images[i] for i in keep], [labels[i] for i in keep]
  out = np.empty(len(images), dtype=object)  # one by one: np.array would try to merge bytes
  out[:] = images
  return Split(out, np.asarray(labels, np.int32))


SOURCES = {
    "digits": lambda cfg, split: _digits(split),
    "tfds": _tfds,
    "vtab_folder": lambda cfg, split: folders.read_vtab_lists(
        cfg.root, split, on_bad_image=cfg.on_bad_image),
    "fgvc_json": lambda cfg, split: folders.read_fgvc_json(
        cfg.root, split, image_dir=cfg.image_dir, on_bad_image=cfg.on_bad_image,
        percentage=cfg.get("percentage", 1.0)),
    "folder": lambda cfg, split: folders.read_class_folders(
        cfg.root, split, on_bad_image=cfg.on_bad_image, val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction),
}


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  if cfg.num_classes:
    return cfg.num_classes
  if cfg.source == "digits":
    return 10
  if cfg.source == "folder":
    if not cfg.root:
      raise ValueError("config data.root must name the dataset folder for source 'folder' "
                       "(--config.data.root=/path/to/images)")
    return len(folders.class_names(cfg.root))
  if cfg.source in ("vtab_folder", "fgvc_json"):
    raise ValueError(f"config data.num_classes must be set for data.source={cfg.source!r}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir or None)
    return builder.info.features[cfg.label_key].num_classes
  except Exception as e:
    raise FileNotFoundError(f"config data.name={cfg.name!r}: cannot read the number of classes "
                            f"({type(e).__name__}: {e}); set config.data.num_classes") from e


def load_splits(cfg: ml_collections.ConfigDict, names: Sequence[str]) -> Dict[str, Split]:
  """The named splits (e.g. cfg.train_split) of the configured source, checked."""
  if cfg.source not in SOURCES:
    raise ValueError(f"config data.source={cfg.source!r}: expected one of {', '.join(SOURCES)}")
  if cfg.on_bad_image not in ("fail", "skip"):
    raise ValueError(f"config data.on_bad_image={cfg.on_bad_image!r}: 'fail' or 'skip'")
  if cfg.source in ("vtab_folder", "fgvc_json", "folder") and not cfg.root:
    raise ValueError(f"config data.root must name the dataset folder for source {cfg.source!r}")
  out = {}
  n_classes = num_classes(cfg)
  loaded = {}
  if "holdout" in names:
    if cfg.val_split != "holdout" or not 0 < cfg.holdout_fraction < 1:
      raise ValueError("config data split 'holdout' needs data.val_split='holdout' and "
                       f"0 < data.holdout_fraction < 1 (got {cfg.holdout_fraction})")
    whole = SOURCES[cfg.source](cfg, cfg.train_split)
    order = np.random.default_rng(cfg.holdout_seed).permutation(len(whole))
    cut = len(whole) - int(round(len(whole) * cfg.holdout_fraction))
    pick = lambda idx: Split(whole.images[np.sort(idx)], whole.labels[np.sort(idx)])
    loaded = {cfg.train_split: pick(order[:cut]), "holdout": pick(order[cut:])}
  for name in names:
    split = loaded.get(name) or SOURCES[cfg.source](cfg, name)
    if not len(split):
      raise ValueError(f"config data split {name!r} is empty")
    bad = (split.labels < 0) | (split.labels >= n_classes)
    if bad.any():
      raise ValueError(f"config data split {name!r}: label {split.labels[bad][0]} is outside "
                       f"0..{n_classes - 1} (num_classes={n_classes})")
    out[name] = split
  return out
