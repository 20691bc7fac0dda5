"""The 19 VTAB-1k tasks as VPT runs them: tfds builders, split arithmetic, label transforms.

Facts come from the VTAB-1k tables of the official VPT code (its `vtab_datasets/`, adapted from
google-research/task_adaptation): train800 is always the first 800 training examples; val200 is
200 examples from the official validation split, or, where a task has none, 200 examples starting
at a fixed fraction of train (the VTAB train/val cut); train800val200 is the union of the two
(1000 examples); test is the official test split, or the tail of train where a task has no test.
Where a slice is derived from a fraction, the table keeps the fraction and the tfds split size,
and the index is computed from them (`_at`), so the arithmetic is visible and tested.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional

import numpy as np

GROUPS = ("natural", "specialized", "structured")


def _at(fraction: float, size: int) -> int:
  """The index where VTAB cuts a split of `size` examples at `fraction` (int(size * fraction))."""
  return int(size * fraction)


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  group: str
  builder: str                 # tfds name:version as VPT used it
  num_classes: int
  train800: str
  val200: str
  test: str
  label_key: str = "label"
  label_transform: str = ""    # a key of LABEL_TRANSFORMS, '' = the label feature as it is
  # The per-task image transform task_adaptation applies before anything else: decoded pixels are
  # multiplied by this (dSprites stores {0, 1}; VTAB multiplies by 255). Grayscale builders
  # (dSprites, smallNORB) are tiled to 3 channels by every pipeline (`data.pipeline`).
  pixel_scale: int = 1

  @property
  def train800val200(self) -> str:
    return f"{self.train800}+{self.val200}"

  def split(self, name: str) -> str:
    if name not in ("train800", "val200", "train800val200", "test"):
      raise ValueError(f"VTAB split {name!r}: expected train800, val200, train800val200 or test")
    return getattr(self, name)


def _val_from_train(fraction: float, size: int) -> str:
  start = _at(fraction, size)
  return f"train[{start}:{start + 200}]"


# Sources: the VPT repository's src/data/vtab_datasets/<file>.py (from task_adaptation) named in
# each row's comment, its VTAB_SETUP.md for builder versions, and the tfds split sizes of the
# builder versions listed (used for the fractional cuts).
TASKS: Dict[str, Task] = {t.name: t for t in [
    # Natural
    Task("caltech101", "natural", "caltech101:3.*.*", 102, "train[:800]",
         _val_from_train(0.9, 3060), "test"),                 # caltech.py; train 3060, val at 90%
    Task("cifar100", "natural", "cifar100:3.*.*", 100, "train[:800]",
         _val_from_train(0.9, 50000), "test"),                # cifar.py; train 50000, val at 90%
    Task("dtd", "natural", "dtd:3.*.*", 47, "train[:800]", "validation[:200]", "test"),  # dtd.py
    Task("oxford_flowers102", "natural", "oxford_flowers102:2.*.*", 102, "train[:800]",
         "validation[:200]", "test"),                         # oxford_flowers102.py
    # VPT used 3.2.0; tfds now serves only 4.x of this builder (same train/test images).
    Task("oxford_iiit_pet", "natural", "oxford_iiit_pet:4.*.*", 37, "train[:800]",
         _val_from_train(0.8, 3680), "test"),                 # oxford_iiit_pet.py; 3680, 80%
    Task("svhn", "natural", "svhn_cropped:3.*.*", 10, "train[:800]",
         _val_from_train(0.9, 73257), "test"),                # svhn.py; train 73257, 90%
    Task("sun397", "natural", "sun397/tfds:4.*.*", 397, "train[:800]", "validation[:200]",
         "test"),                                             # sun397.py
    # Specialized
    Task("patch_camelyon", "specialized", "patch_camelyon:2.*.*", 2, "train[:800]",
         "validation[:200]", "test"),                         # patch_camelyon.py
    Task("eurosat", "specialized", "eurosat/rgb:2.*.*", 10, "train[:800]",
         _val_from_train(0.6, 27000), f"train[{_at(0.8, 27000)}:]"),  # eurosat.py; 60/20/20
    Task("resisc45", "specialized", "resisc45:3.*.*", 45, "train[:800]",
         _val_from_train(0.6, 31500), f"train[{_at(0.8, 31500)}:]"),  # resisc45.py; 60/20/20
    Task("diabetic_retinopathy", "specialized",
         "diabetic_retinopathy_detection/btgraham-300:3.*.*", 5, "train[:800]",
         "validation[:200]", "test"),                         # diabetic_retinopathy.py
    # Structured
    Task("clevr_count", "structured", "clevr:3.*.*", 8, "train[:800]",
         _val_from_train(0.9, 70000), "validation",           # clevr.py; test = validation
         label_transform="clevr_count"),
    Task("clevr_distance", "structured", "clevr:3.*.*", 6, "train[:800]",
         _val_from_train(0.9, 70000), "validation", label_transform="clevr_distance"),
    Task("dmlab", "structured", "dmlab:2.0.1", 6, "train[:800]", "validation[:200]",
         "test"),                                             # dmlab.py
    # kitti.py. The VTAB repository names kitti 3.1.0; 3.2.0 is the version with these splits.
    Task("kitti_distance", "structured", "kitti:3.2.0", 4, "train[:800]", "validation[:200]",
         "test", label_transform="kitti_distance"),
    Task("dsprites_location", "structured", "dsprites:2.*.*", 16, "train[:800]",
         _val_from_train(0.8, 737280), f"train[{_at(0.9, 737280)}:]",  # dsprites.py; 80/10/10
         label_key="label_x_position", label_transform="dsprites_location",
         pixel_scale=255),
    Task("dsprites_orientation", "structured", "dsprites:2.*.*", 16, "train[:800]",
         _val_from_train(0.8, 737280), f"train[{_at(0.9, 737280)}:]",
         label_key="label_orientation", label_transform="dsprites_orientation",
         pixel_scale=255),
    Task("smallnorb_azimuth", "structured", "smallnorb:2.*.*", 18, "train[:800]", "test[:200]",
         "test[50%:]", label_key="label_azimuth"),            # smallnorb.py: val/test from test
    Task("smallnorb_elevation", "structured", "smallnorb:2.*.*", 9, "train[:800]", "test[:200]",
         "test[50%:]", label_key="label_elevation"),
]}


# What task_adaptation's per-task `preprocess_fn` does to the image, checked against each of the
# 19 rows (VPT's src/data/vtab_datasets/*.py; tests/test_vtab.py checks the value range of every
# task's preprocessed mock images built with the builder's real dtype, channels and range):
# - dsprites.py: `tf.tile(image, [1, 1, 3]) * 255` (stored {0, 1}, 1 channel) -> pixel_scale=255
#   and the pipeline's grayscale -> RGB.
# - smallnorb.py: `tf.tile(image, [1, 1, 3])` (uint8 0..255, 1 channel) -> grayscale -> RGB.
# - every other task: the RGB uint8 image as stored, no crop; then VPT's loader resizes it to
#   224x224 (bilinear, aspect not kept). diabetic_retinopathy's heavy augmentation is off in
#   VTAB-1k (task_adaptation's default); the btgraham-300 builder is already cropped to 300px.
PREPROCESSING_CHECKED = tuple(TASKS)


# ------------------------------------------------------------------------------------------------
# Label transforms: example (numpy dict from tfds) -> int label.

def _last_below(thresholds, value: float) -> int:
  """Index of the last threshold strictly below `value` (VTAB's distance binning)."""
  return int(np.max(np.nonzero(np.asarray(thresholds) < value)[0]))


def _clevr_count(ex: Mapping[str, Any]) -> int:
  return len(ex["objects"]["size"]) - 3                      # 3..10 objects -> 0..7


def _clevr_distance(ex: Mapping[str, Any]) -> int:
  depth = float(np.min(ex["objects"]["pixel_coords"][:, 2]))  # the closest object's depth
  return _last_below([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0], depth)


_KITTI_VEHICLES = (0, 1, 2)  # tfds kitti object types: Car, Van, Truck


def _kitti_distance(ex: Mapping[str, Any]) -> int:
  objects = ex["objects"]
  vehicles = np.isin(objects["type"], _KITTI_VEHICLES)
  location = np.asarray(objects["location"], np.float64).reshape(-1, 3)
  z = np.concatenate([location[vehicles, 2], [1000.0]])      # 1000: no vehicle at all
  return _last_below([-100.0, 8.0, 20.0, 999.0], float(z.min()))


LABEL_TRANSFORMS: Dict[str, Callable[[Mapping[str, Any]], int]] = {
    "clevr_count": _clevr_count,
    "clevr_distance": _clevr_distance,
    "kitti_distance": _kitti_distance,
    # 32 x positions -> 16 bins, 40 orientations -> 16 bins (floor of label * 16 / n).
    "dsprites_location": lambda ex: int(ex["label_x_position"] // 2),
    "dsprites_orientation": lambda ex: int(ex["label_orientation"] // 2.5),
}


def label_transform(name: str) -> Optional[Callable[[Mapping[str, Any]], int]]:
  if not name:
    return None
  if name not in LABEL_TRANSFORMS:
    raise ValueError(f"config data.label_transform={name!r}: expected one of "
                     f"{', '.join(LABEL_TRANSFORMS)} or ''")
  return LABEL_TRANSFORMS[name]
