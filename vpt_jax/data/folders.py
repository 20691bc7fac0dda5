"""Splits read from image folders: VTAB-1k list files, the VPT FGVC JSONs, class folder trees.

The images are returned still encoded (the file bytes, decoded later by the tf.data pipeline), so a
split costs its size on disk in memory and nothing is decoded twice. Each file is only checked for a
JPEG/PNG/GIF/BMP signature: a cheap test that catches the usual broken downloads (HTML error pages,
empty or truncated-to-nothing files) before a run starts, instead of as a decode error mid-epoch.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from vpt_jax.data import decode_check
from vpt_jax.data.split import Split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
VTAB_LISTS = ("train800", "val200", "train800val200", "test")
FGVC_SPLITS = ("train", "val", "test")
FOLDER_SPLITS = ("train", "val", "test")
BAD_IMAGE_MODES = ("fail", "skip")
# The formats tf.io.decode_image reads, by their leading bytes.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
_WARN_NAMES = 5  # how many skipped files a warning names

_VTAB_LAYOUT = (
    "a VTAB-1k task folder holding train800.txt, val200.txt, train800val200.txt and test.txt "
    "(lines 'relative/path label') and the images they list, usually under images/: extract the "
    "pre-extracted VTAB-1k archive and pass one task folder (e.g. .../vtab-1k/cifar)")
_FGVC_LAYOUT = (
    "an FGVC folder holding train.json, val.json (optional) and test.json (each mapping an image "
    "path to its label) and the images under root/image_dir: download the dataset, extract it and "
    "copy the VPT split JSONs next to it")
_FOLDER_LAYOUT = (
    "an image folder tree root/<class_name>/<image files>, or one already split as "
    "root/train/<class_name>/..., root/test/<class_name>/... (and optionally root/val/...)")

# One example to read: (absolute image path, label, where it was listed, for error messages).
_Item = Tuple[str, int, str]


def _check_mode(on_bad_image: str) -> None:
  if on_bad_image not in BAD_IMAGE_MODES:
    raise ValueError(f"on_bad_image={on_bad_image!r}: expected one of {', '.join(BAD_IMAGE_MODES)}")


def _check_root(root: str, layout: str) -> None:
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: no such directory; expected {layout}")


def _parse_label(value: object, where: str) -> int:
  """An int label from a list line or JSON value; bools and fractional numbers are mistakes."""
  label: Optional[int] = None
  if isinstance(value, int) and not isinstance(value, bool):
    label = value
  elif isinstance(value, str):
    try:
      label = int(value.strip())
    except ValueError:
      pass
  if label is None:
    raise ValueError(f"{where}: label {value!r} is not an integer")
  if label < 0:
    raise ValueError(f"{where}: label {label} is negative")
  return label


def is_image(data: bytes) -> bool:
  return data.startswith(_SIGNATURES)


def _read_items(items: Sequence[_Item], what: str, on_bad_image: str) -> Split:
  """The files' bytes; a missing file raises, a bad one raises or is skipped with one warning."""
  images: List[bytes] = []
  labels: List[int] = []
  skipped: List[str] = []
  kept: List[Tuple[str, str]] = []
  for path, label, listed in items:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: image listed in {listed} is missing")
    with open(path, "rb") as f:
      data = f.read()
    if not is_image(data):
      if on_bad_image == "fail":
        raise ValueError(
            f"{path}: not a JPEG/PNG/GIF/BMP image (starts with {data[:8]!r}), listed in {listed}; "
            "replace it, or pass on_bad_image='skip' to drop unreadable images")
      skipped.append(path)
      continue
    images.append(data)
    labels.append(label)
    kept.append((path, listed))
  # A valid signature on a corrupt body: decoded once here, not mid-epoch inside tf.data.
  bad = [(i, why) for i, why in enumerate(decode_check.decode_errors(images)) if why]
  if bad and on_bad_image == "fail":
    (path, listed), why = kept[bad[0][0]], bad[0][1]
    raise ValueError(f"{path}: image listed in {listed} does not decode ({why})"
                     + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
                     + "; replace it, or pass on_bad_image='skip' to drop unreadable images")
  if bad:
    drop = {i for i, _ in bad}
    skipped.extend(kept[i][0] for i in sorted(drop))
    images = [im for i, im in enumerate(images) if i not in drop]
    labels = [lb for i, lb in enumerate(labels) if i not in drop]
  if skipped:
    names = ", ".join(skipped[:_WARN_NAMES]) + (", ..." if len(skipped) > _WARN_NAMES else "")
    warnings.warn(f"{what}: skipped {len(skipped)} unreadable image(s) (not a decodable "
                  f"JPEG/PNG/GIF/BMP): "
                  f"{names}", stacklevel=3)
  if not labels:
    raise ValueError(f"{what} is empty" + (f" (all {len(skipped)} images were unreadable)"
                                           if skipped else ""))
  out = np.empty(len(images), dtype=object)  # filled one by one: np.array would try to merge bytes
  out[:] = images
  return Split(out, np.asarray(labels, np.int32))


def _existing(root: str, suffix: str) -> str:
  found = sorted(f for f in os.listdir(root) if f.endswith(suffix))
  return f"it has {', '.join(found)}" if found else f"it has no {suffix} files"


# ----------------------------------------------------------------------------- VTAB-1k list files


def read_vtab_lists(root: str, split: str, *, on_bad_image: str = "fail") -> Split:
  """A split of a pre-extracted VTAB-1k task folder: the images listed in root/<split>.txt.

  split: the list file's name without .txt (train800, val200, train800val200, test). Each line is
  'relative/path label' with the path relative to root; it is split on its last whitespace, so
  paths may contain spaces. Blank lines are ignored; the order is the file's.
  on_bad_image: 'fail' raises on a file that is not a JPEG/PNG/GIF/BMP image, 'skip' drops such
  files with one warning. A listed file that does not exist always raises.
  """
  _check_mode(on_bad_image)
  _check_root(root, _VTAB_LAYOUT)
  list_path = os.path.join(root, f"{split}.txt")
  if not os.path.isfile(list_path):
    raise FileNotFoundError(f"{list_path}: no list file for split {split!r} "
                            f"({_existing(root, '.txt')}); expected {_VTAB_LAYOUT}")
  items: List[_Item] = []
  with open(list_path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{list_path} line {n}"
      fields = line.rsplit(maxsplit=1)
      if len(fields) != 2:
        raise ValueError(f"{where}: expected 'relative/path label', got {line.strip()!r}")
      rel, label = fields
      items.append((os.path.join(root, rel.strip()), _parse_label(label, where), where))
  if not items:
    raise ValueError(f"{list_path} lists no images")
  return _read_items(items, f"VTAB split {split!r} ({list_path})", on_bad_image)


# ----------------------------------------------------------------------------- FGVC JSON files


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(table, dict):
    raise ValueError(f"{path}: expected a JSON object mapping image path -> label, "
                     f"got a {type(table).__name__}")
  return table


def fgvc_label_ids(root: str, fallback: str) -> Dict[int, int]:
  """Label value -> contiguous id, as the official json reader: the sorted unique labels (of
  train.json, the full training set; of the `fallback` json file without one), so 1-based or
  sparse label files (NABirds) load."""
  path = os.path.join(root, "train.json")
  path = path if os.path.isfile(path) else fallback
  table = _read_json(path)
  values = sorted({_parse_label(v, f"{path} entry {k!r}") for k, v in table.items()})
  return {v: i for i, v in enumerate(values)}


def fgvc_train_file(percentage: float) -> str:
  """The training list of a data fraction: train.json, or the official `train_{p}.json` subset
  (`DATA.PERCENTAGE` of the VPT code, e.g. train_0.1.json) when percentage < 1."""
  if not 0 < percentage <= 1:
    raise ValueError(f"config data.percentage={percentage}: expected 0 < percentage <= 1")
  return "train.json" if percentage == 1 else f"train_{percentage}.json"


def read_fgvc_json(root: str, split: str, *, image_dir: str = "",
                   on_bad_image: str = "fail", percentage: float = 1.0) -> Split:
  """A split of a VPT FGVC folder: root/<split>.json maps image path -> label.

  Images are read from root/image_dir/<path> (CUB: 'images', Stanford Dogs: 'Images', Cars and
  Flowers: ''), in order of path, so the order does not depend on the JSON's. Without val.json,
  'train' and 'val' are cut from train.json: a numpy default_rng(0) permutation of its sorted paths,
  the first 90% (floor) for train and the rest for val, each then sorted by path — fixed, so the
  validation images never leak into training across runs.
  on_bad_image: as in `read_vtab_lists`.
  Labels are remapped to contiguous ids (`fgvc_label_ids`). percentage < 1 trains on the official
  few-shot subset `train_{percentage}.json` (split 'train' only; with val.json present).
  """
  _check_mode(on_bad_image)
  if split not in FGVC_SPLITS:
    raise ValueError(f"FGVC split {split!r}: expected one of {', '.join(FGVC_SPLITS)}")
  _check_root(root, _FGVC_LAYOUT)
  derive = split in ("train", "val") and not os.path.isfile(os.path.join(root, "val.json"))
  train_file = fgvc_train_file(percentage)
  if derive and percentage != 1:
    raise ValueError(f"config data.percentage={percentage} needs val.json in {root}: the "
                     f"official subsets ({train_file}) are cut from the 90% train.json")
  json_path = os.path.join(root, "train.json" if derive else
                           train_file if split == "train" else f"{split}.json")
  if not os.path.isfile(json_path):
    note = " (val.json is missing too, so val would be cut from train.json)" if derive else ""
    raise FileNotFoundError(f"{json_path}: no split file for split {split!r}{note} "
                            f"({_existing(root, '.json')}); expected {_FGVC_LAYOUT}")
  table = _read_json(json_path)
  paths = sorted(table)
  if derive:
    order = np.random.default_rng(0).permutation(len(paths))
    n_train = (9 * len(paths)) // 10
    picked = order[:n_train] if split == "train" else order[n_train:]
    paths = sorted(paths[i] for i in picked)
  if not paths:
    raise ValueError(f"{json_path} lists no images" +
                     (f" for the derived {split!r} part" if derive else ""))
  image_root = os.path.join(root, image_dir)
  labels = {p: _parse_label(table[p], f"{json_path} entry {p!r}") for p in paths}
  ids = fgvc_label_ids(root, json_path)
  items = []
  for p in paths:
    where = f"{json_path} entry {p!r}"
    label = labels[p]
    if label not in ids:
      raise ValueError(f"{where}: label {label} does not occur in "
                       f"{os.path.join(root, 'train.json')}")
    items.append((os.path.join(image_root, p), ids[label], where))
  what = f"FGVC split {split!r} ({json_path}{', 90/10 cut' if derive else ''})"
  return _read_items(items, what, on_bad_image)


# ----------------------------------------------------------------------------- class folders


def _subdirs(path: str) -> List[str]:
  return sorted(d for d in os.listdir(path)
                if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def _image_files(path: str) -> List[str]:
  return sorted(f for f in os.listdir(path) if not f.startswith(".")
                and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, f)))


def _presplit(root: str) -> bool:
  """Whether root holds train/ and test/ split folders rather than class folders."""
  has_train, has_test = (os.path.isdir(os.path.join(root, s)) for s in ("train", "test"))
  if has_train != has_test:
    raise ValueError(f"{root}: has {'train/' if has_train else 'test/'} but no "
                     f"{'test/' if has_train else 'train/'}; expected {_FOLDER_LAYOUT}")
  return has_train


def class_names(root: str) -> List[str]:
  """The sorted class folder names (of root/train/ when root is split); label k is the k-th."""
  _check_root(root, _FOLDER_LAYOUT)
  base = os.path.join(root, "train") if _presplit(root) else root
  names = _subdirs(base)
  if not names:
    raise ValueError(f"{base}: no class folders; expected {_FOLDER_LAYOUT}")
  return names


def _cut(files: List[str], name: str, seed: int, fractions: Sequence[float]) -> List[List[str]]:
  """Cuts one class's sorted files into parts of the given fractions (the rest last).

  The permutation is seeded by (seed, a hash of the class name), so adding or removing another
  class leaves this one's cut unchanged.
  """
  order = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))]).permutation(len(files))
  parts, start = [], 0
  for fraction in fractions:
    n = int(math.floor(len(files) * fraction + 0.5))
    parts.append(sorted(files[i] for i in order[start:start + n]))
    start += n
  parts.append(sorted(files[i] for i in order[start:]))
  return parts


def read_class_folders(root: str, split: str, *, on_bad_image: str = "fail",
                       val_fraction: float = 0.1, test_fraction: float = 0.0,
                       seed: int = 0) -> Split:
  """A split of an image folder tree: labels are the indices of the sorted class folder names.

  If root has train/ and test/ (and optionally val/) folders, each holds class folders and is that
  split; the class list is train/'s (a class folder train/ lacks is an error). Without val/, 'train'
  and 'val' are cut from train/ per class by val_fraction. Otherwise root/<class>/ holds all images
  and each class is cut into test (test_fraction), val (val_fraction) and train (the rest),
  rounding to the nearest count, with a permutation fixed by seed and the class name.
  Images are the *.jpg/jpeg/png/bmp/gif files directly in a class folder (any case; hidden files
  ignored), ordered by class then file name. on_bad_image: as in `read_vtab_lists`.
  """
  _check_mode(on_bad_image)
  if split not in FOLDER_SPLITS:
    raise ValueError(f"class-folder split {split!r}: expected one of {', '.join(FOLDER_SPLITS)}")
  if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
    raise ValueError(f"val_fraction={val_fraction}, test_fraction={test_fraction}: expected "
                     "non-negative fractions summing to less than 1")
  names = class_names(root)
  presplit = _presplit(root)
  if presplit and (split == "test" or os.path.isdir(os.path.join(root, "val"))):
    base, fractions, part = os.path.join(root, split), None, 0
  elif presplit:  # train or val, cut from train/
    base, fractions, part = os.path.join(root, "train"), (val_fraction,), 0 if split == "val" else 1
  else:
    base, fractions = root, (test_fraction, val_fraction)
    part = {"test": 0, "val": 1, "train": 2}[split]
  if fractions is None:
    extra = sorted(set(_subdirs(base)) - set(names))
    if extra:
      raise ValueError(f"{base}: class folder(s) {', '.join(extra)} not in "
                       f"{os.path.join(root, 'train')} (whose folders define the labels)")
  items: List[_Item] = []
  for label, name in enumerate(names):
    folder = os.path.join(base, name)
    files = _image_files(folder) if os.path.isdir(folder) else []
    if not files and os.path.isdir(folder):
      warnings.warn(f"{folder}: class folder {name!r} (label {label}) holds no "
                    f"{'/'.join(IMAGE_EXTENSIONS)} images; the class gets no examples",
                    stacklevel=2)
    if fractions is not None:
      files = _cut(files, name, seed, fractions)[part]
    items.extend((os.path.join(folder, f), label, folder) for f in files)
  if not items:
    how = f"{split} folder {base}" if fractions is None else (
        f"{split} part of {base} (val_fraction={val_fraction}, test_fraction={test_fraction})")
    raise ValueError(f"class-folder split {split!r} is empty: no images in the {how}")
  return _read_items(items, f"class-folder split {split!r} ({base})", on_bad_image)
