"""Folder sources: VTAB-1k list files, VPT FGVC JSONs, class folders, and their errors."""

import json
import os
import re
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vpt_jax.data import folders


def write_image(path, value: int, fmt: str = "PNG") -> bytes:
  """An 8x8 noise image (seeded by value and path, so no two files share bytes); returns them."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng([value, zlib.crc32(str(path).encode())])
  Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path, format=fmt)
  with open(path, "rb") as f:
    return f.read()


def write_text(path, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def file_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def pat(path) -> str:
  return re.escape(str(path))


# ----------------------------------------------------------------------------- VTAB-1k lists


@pytest.fixture
def vtab(tmp_path):
  root = tmp_path / "cifar"
  rels = [f"images/{'a b' if i == 3 else 'img'}{i}.{'jpg' if i % 2 else 'png'}" for i in range(10)]
  for i, rel in enumerate(rels):
    write_image(root / rel, 20 * i, "JPEG" if i % 2 else "PNG")
  labels = [i % 4 for i in range(10)]
  line = lambda i: f"{rels[i]} {labels[i]}\n"
  write_text(root / "train800.txt", "".join(line(i) for i in range(6)))
  write_text(root / "val200.txt", "".join(line(i) for i in range(6, 8)) + "\n")
  write_text(root / "train800val200.txt", "".join(line(i) for i in range(8)))
  write_text(root / "test.txt", "".join(line(i) for i in (9, 8)))
  return root, rels, labels


def test_vtab_lists_read_bytes_labels_and_order(vtab):
  root, rels, labels = vtab
  sizes = {"train800": 6, "val200": 2, "train800val200": 8, "test": 2}
  for split, n in sizes.items():
    s = folders.read_vtab_lists(str(root), split)
    assert len(s) == n and s.encoded and s.labels.dtype == np.int32
  s = folders.read_vtab_lists(str(root), "test")
  assert list(s.labels) == [labels[9], labels[8]]  # the file's order
  assert [bytes(b) for b in s.images] == [file_bytes(root / rels[9]), file_bytes(root / rels[8])]
  s = folders.read_vtab_lists(str(root), "train800")
  assert s.images[3] == file_bytes(root / "images/a b3.jpg")  # a path with a space
  assert s.images[0].startswith(b"\x89PNG") and s.images[1].startswith(b"\xff\xd8\xff")
  again = folders.read_vtab_lists(str(root), "train800")
  assert list(again.images) == list(s.images) and list(again.labels) == list(s.labels)


def test_vtab_errors_name_the_path(vtab, tmp_path):
  root, rels, _ = vtab
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=pat(missing) + ".*VTAB-1k task folder"):
    folders.read_vtab_lists(str(missing), "train800")
  with pytest.raises(FileNotFoundError,
                     match=pat(root / "train1000.txt") + r".*it has test.txt, train800.txt"):
    folders.read_vtab_lists(str(root), "train1000")
  write_text(root / "empty.txt", "\n\n")
  with pytest.raises(ValueError, match=pat(root / "empty.txt") + " lists no images"):
    folders.read_vtab_lists(str(root), "empty")
  write_text(root / "bad.txt", f"{rels[0]} 1\n{rels[1]} cat\n")
  with pytest.raises(ValueError,
                     match=pat(root / "bad.txt") + " line 2: label 'cat' is not an integer"):
    folders.read_vtab_lists(str(root), "bad")
  write_text(root / "neg.txt", f"{rels[0]} -1\n")
  with pytest.raises(ValueError, match=pat(root / "neg.txt") + " line 1: label -1 is negative"):
    folders.read_vtab_lists(str(root), "neg")
  write_text(root / "nolabel.txt", f"{rels[0]}\n")
  with pytest.raises(ValueError, match=pat(root / "nolabel.txt") + " line 1: expected"):
    folders.read_vtab_lists(str(root), "nolabel")
  write_text(root / "gone.txt", f"{rels[0]} 0\nimages/gone.png 1\n")
  with pytest.raises(FileNotFoundError,
                     match=pat(root / "images/gone.png") + ".*listed in .*gone.txt line 2"):
    folders.read_vtab_lists(str(root), "gone")
  with pytest.raises(ValueError, match="on_bad_image='ignore'"):
    folders.read_vtab_lists(str(root), "train800", on_bad_image="ignore")


def test_vtab_bad_images_fail_or_skip_with_one_warning(vtab):
  root, rels, labels = vtab
  write_text(root / "images/html.png", "<html>404 Not Found</html>")
  write_text(root / "images/empty.jpg", "")
  write_text(root / "withbad.txt",
             f"{rels[0]} 0\nimages/html.png 1\n{rels[1]} 1\nimages/empty.jpg 2\n")
  with pytest.raises(ValueError, match=pat(root / "images/html.png") + ".*not a JPEG/PNG/GIF/BMP"):
    folders.read_vtab_lists(str(root), "withbad")
  with pytest.warns(UserWarning,
                    match=r"skipped 2 unreadable image\(s\).*html.png.*empty.jpg") as w:
    s = folders.read_vtab_lists(str(root), "withbad", on_bad_image="skip")
  assert len([x for x in w if "unreadable" in str(x.message)]) == 1
  assert len(s) == 2 and list(s.labels) == [0, 1]
  assert list(s.images) == [file_bytes(root / rels[0]), file_bytes(root / rels[1])]
  with warnings.catch_warnings():  # nothing to skip: no warning
    warnings.simplefilter("error")
    folders.read_vtab_lists(str(root), "train800", on_bad_image="skip")
  write_text(root / "allbad.txt", "images/html.png 1\n")
  with pytest.warns(UserWarning, match="skipped 1"):
    with pytest.raises(ValueError, match=r"is empty \(all 1 images were unreadable\)"):
      folders.read_vtab_lists(str(root), "allbad", on_bad_image="skip")


def test_skip_warning_names_only_the_first_few(vtab):
  root, _, _ = vtab
  for i in range(8):
    write_text(root / f"images/bad{i}.png", "junk")
  write_text(root / "many.txt", "".join(f"images/bad{i}.png 0\n" for i in range(8)) +
             "images/img0.png 0\n")
  with pytest.warns(UserWarning, match="skipped 8 ") as w:
    folders.read_vtab_lists(str(root), "many", on_bad_image="skip")
  message = str(w[0].message)
  assert "bad4.png" in message and "bad5.png" not in message and message.endswith(", ...")


# ----------------------------------------------------------------------------- FGVC JSONs


def make_fgvc(root, n_train=20, n_test=5, image_dir="images", with_val=False):
  table = {}
  for i in range(n_train + n_test):
    rel = f"{i % 3:03d}.class/img_{i:02d}.jpg"
    write_image(root / image_dir / rel, 7 * i, "JPEG")
    table[rel] = i % 3
  keys = list(table)[::-1]  # a JSON order that is not the sorted one
  train = {k: table[k] for k in keys if int(k[-6:-4]) < n_train}
  test = {k: table[k] for k in keys if int(k[-6:-4]) >= n_train}
  if with_val:
    val = dict(list(train.items())[:4])
    train = dict(list(train.items())[4:])
    write_text(root / "val.json", json.dumps(val))
  write_text(root / "train.json", json.dumps(train))
  write_text(root / "test.json", json.dumps(test))
  return table


def test_fgvc_reads_sorted_paths_with_their_bytes(tmp_path):
  root = tmp_path / "cub"
  table = make_fgvc(root, with_val=True)
  test = json.loads((root / "test.json").read_text())
  s = folders.read_fgvc_json(str(root), "test", image_dir="images")
  assert len(s) == 5
  assert list(s.labels) == [table[k] for k in sorted(test)]
  assert list(s.images) == [file_bytes(root / "images" / k) for k in sorted(test)]
  assert len(folders.read_fgvc_json(str(root), "train", image_dir="images")) == 16
  assert len(folders.read_fgvc_json(str(root), "val", image_dir="images")) == 4


def test_fgvc_derives_a_fixed_90_10_split_without_val_json(tmp_path):
  root = tmp_path / "flowers"
  table = make_fgvc(root, n_train=25, image_dir="")
  train_keys = sorted(json.loads((root / "train.json").read_text()))
  by_bytes = {file_bytes(root / k): k for k in train_keys}
  train = folders.read_fgvc_json(str(root), "train")
  val = folders.read_fgvc_json(str(root), "val")
  assert (len(train), len(val)) == (22, 3)  # floor(0.9 * 25), the rest
  tk, vk = [by_bytes[b] for b in train.images], [by_bytes[b] for b in val.images]
  assert not set(tk) & set(vk) and sorted(tk + vk) == train_keys
  assert tk == sorted(tk) and vk == sorted(vk)
  assert list(train.labels) == [table[k] for k in tk]
  order = np.random.default_rng(0).permutation(25)
  assert vk == sorted(train_keys[i] for i in order[22:])
  again = folders.read_fgvc_json(str(root), "val")
  assert list(again.images) == list(val.images)
  assert len(folders.read_fgvc_json(str(root), "test")) == 5


def test_fgvc_labels_are_remapped_to_contiguous_ids_and_fractions_read_train_p(tmp_path):
  """1-based, sparse labels (NABirds) -> sorted unique values of train.json -> 0..C-1; the
  official few-shot subsets train_{p}.json; a label train.json lacks is named."""
  root = tmp_path / "nabirds"
  table = make_fgvc(root, with_val=True)
  sparse = {0: 1, 1: 295, 2: 1010}
  for name in ("train", "val", "test"):
    t = json.loads((root / f"{name}.json").read_text())
    write_text(root / f"{name}.json", json.dumps({k: sparse[v] for k, v in t.items()}))
  test = folders.read_fgvc_json(str(root), "test", image_dir="images")
  keys = sorted(json.loads((root / "test.json").read_text()))
  assert list(test.labels) == [table[k] for k in keys]  # 1, 295, 1010 -> 0, 1, 2
  train = json.loads((root / "train.json").read_text())
  few = dict(list(train.items())[:5])
  write_text(root / "train_0.1.json", json.dumps(few))
  assert len(folders.read_fgvc_json(str(root), "train", image_dir="images", percentage=0.1)) == 5
  with pytest.raises(FileNotFoundError, match="train_0.5.json"):
    folders.read_fgvc_json(str(root), "train", image_dir="images", percentage=0.5)
  write_text(root / "test.json", json.dumps({keys[0]: 7}))
  with pytest.raises(ValueError, match="label 7 does not occur in .*train.json"):
    folders.read_fgvc_json(str(root), "test", image_dir="images")


def test_fgvc_errors_name_the_path(tmp_path):
  root = tmp_path / "dogs"
  make_fgvc(root, image_dir="Images")
  with pytest.raises(FileNotFoundError, match=pat(tmp_path / "nope") + ".*FGVC folder"):
    folders.read_fgvc_json(str(tmp_path / "nope"), "train")
  with pytest.raises(ValueError, match="FGVC split 'dev'"):
    folders.read_fgvc_json(str(root), "dev")
  with pytest.raises(ValueError, match="on_bad_image='warn'"):
    folders.read_fgvc_json(str(root), "test", on_bad_image="warn")
  # image_dir left out: the listed images are not under root
  with pytest.raises(FileNotFoundError, match=pat(root / "000.class") + ".*listed in .*test.json"):
    folders.read_fgvc_json(str(root), "test")
  os.remove(root / "test.json")
  with pytest.raises(FileNotFoundError, match=pat(root / "test.json") + ".*it has train.json"):
    folders.read_fgvc_json(str(root), "test", image_dir="Images")
  os.remove(root / "train.json")
  with pytest.raises(FileNotFoundError,
                     match=pat(root / "train.json") + r".*val.json is missing too.*no .json files"):
    folders.read_fgvc_json(str(root), "val", image_dir="Images")
  write_text(root / "test.json", json.dumps({"000.class/img_00.jpg": 1.5}))
  with pytest.raises(ValueError, match=pat(root / "test.json") +
                     r" entry '000.class/img_00.jpg': label 1.5 is not an integer"):
    folders.read_fgvc_json(str(root), "test", image_dir="Images")
  write_text(root / "test.json", json.dumps({"000.class/img_00.jpg": -2}))
  with pytest.raises(ValueError, match=pat(root / "test.json") + ".*label -2 is negative"):
    folders.read_fgvc_json(str(root), "test", image_dir="Images")
  write_text(root / "test.json", "{}")
  with pytest.raises(ValueError, match=pat(root / "test.json") + " lists no images"):
    folders.read_fgvc_json(str(root), "test", image_dir="Images")
  write_text(root / "test.json", "[1, 2]")
  with pytest.raises(ValueError, match=pat(root / "test.json") + ": expected a JSON object"):
    folders.read_fgvc_json(str(root), "test", image_dir="Images")
  write_text(root / "test.json", "{oops")
  with pytest.raises(ValueError, match=pat(root / "test.json") + ": not valid JSON"):
    folders.read_fgvc_json(str(root), "test", image_dir="Images")


def test_fgvc_skips_bad_images_with_a_warning(tmp_path):
  root = tmp_path / "cars"
  make_fgvc(root, image_dir="")
  test = sorted(json.loads((root / "test.json").read_text()))
  write_text(root / test[1], "not an image")
  with pytest.raises(ValueError, match=pat(root / test[1]) + ".*on_bad_image='skip'"):
    folders.read_fgvc_json(str(root), "test")
  with pytest.warns(UserWarning, match="skipped 1 unreadable.*" + re.escape(test[1])):
    s = folders.read_fgvc_json(str(root), "test", on_bad_image="skip")
  assert len(s) == 4


# ----------------------------------------------------------------------------- class folders


def make_classes(root, counts, exts=("png", "jpg")):
  """counts: class name -> number of images; alternating PNG and JPEG files."""
  for name, n in counts.items():
    for i in range(n):
      ext = exts[i % len(exts)]
      write_image(root / name / f"im{i:02d}.{ext}", 11 * i, "PNG" if ext == "png" else "JPEG")


def test_class_folders_cut_each_class_by_fractions(tmp_path):
  root = tmp_path / "pets"
  counts = {"dog": 20, "cat": 10, "bird": 30}
  make_classes(root, counts)
  write_text(root / "cat" / "notes.txt", "ignored: not an image extension")
  write_text(root / ".cache" / "x.png", "hidden folder: not a class")
  assert folders.class_names(str(root)) == ["bird", "cat", "dog"]
  kw = dict(val_fraction=0.2, test_fraction=0.3)
  parts = {s: folders.read_class_folders(str(root), s, **kw) for s in ("train", "val", "test")}
  names = ["bird", "cat", "dog"]
  for label, name in enumerate(names):
    n = counts[name]
    sizes = [int((parts[s].labels == label).sum()) for s in ("train", "val", "test")]
    assert sizes == [n - round(n * 0.2) - round(n * 0.3), round(n * 0.2), round(n * 0.3)]
  everything = [bytes(b) for s in parts.values() for b in s.images]
  on_disk = [file_bytes(root / c / f) for c in names for f in sorted(os.listdir(root / c))
             if not f.endswith(".txt")]
  assert sorted(everything) == sorted(on_disk) and len(set(everything)) == len(everything)
  s = parts["train"]
  assert list(s.labels) == sorted(s.labels)  # class by class
  for split, p in parts.items():
    again = folders.read_class_folders(str(root), split, **kw)
    assert list(again.images) == list(p.images) and list(again.labels) == list(p.labels)
  other = folders.read_class_folders(str(root), "val", seed=1, **kw)
  assert list(other.images) != list(parts["val"].images)
  # another class changes no existing class's cut
  make_classes(root, {"aardvark": 10})
  val = folders.read_class_folders(str(root), "val", **kw)
  assert list(val.images[val.labels > 0]) == list(parts["val"].images)


def test_class_folders_default_fractions_and_errors(tmp_path):
  root = tmp_path / "tiny"
  make_classes(root, {"a": 10, "b": 10})
  assert len(folders.read_class_folders(str(root), "train")) == 18
  assert len(folders.read_class_folders(str(root), "val")) == 2
  with pytest.raises(ValueError, match=r"split 'test' is empty.*test_fraction=0.0"):
    folders.read_class_folders(str(root), "test")
  with pytest.raises(FileNotFoundError, match=pat(tmp_path / "nope") + ".*<class_name>"):
    folders.read_class_folders(str(tmp_path / "nope"), "train")
  with pytest.raises(FileNotFoundError, match=pat(tmp_path / "nope")):
    folders.class_names(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="split 'holdout'"):
    folders.read_class_folders(str(root), "holdout")
  with pytest.raises(ValueError, match="val_fraction=0.6, test_fraction=0.5"):
    folders.read_class_folders(str(root), "train", val_fraction=0.6, test_fraction=0.5)
  with pytest.raises(ValueError, match="on_bad_image='drop'"):
    folders.read_class_folders(str(root), "train", on_bad_image="drop")
  (tmp_path / "flat").mkdir()
  write_text(tmp_path / "flat" / "x.png", "no class folders")
  with pytest.raises(ValueError, match=pat(tmp_path / "flat") + ": no class folders"):
    folders.read_class_folders(str(tmp_path / "flat"), "train")
  write_text(root / "b" / "broken.jpg", "<html>")
  with pytest.raises(ValueError, match=pat(root / "b" / "broken.jpg") + ".*not a JPEG"):
    folders.read_class_folders(str(root), "train", val_fraction=0.0)
  with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\).*broken.jpg") as w:
    s = folders.read_class_folders(str(root), "train", val_fraction=0.0, on_bad_image="skip")
  assert len(w) == 1 and len(s) == 20


def test_class_folders_with_train_test_subfolders(tmp_path):
  root = tmp_path / "split"
  make_classes(root / "train", {"x": 6, "y": 4, "z": 5})
  make_classes(root / "test", {"x": 2, "z": 3})  # a class may be absent from test
  assert folders.class_names(str(root)) == ["x", "y", "z"]
  test = folders.read_class_folders(str(root), "test")
  assert list(test.labels) == [0, 0, 2, 2, 2]
  assert list(test.images) == [file_bytes(root / "test" / c / f) for c, fs in
                               (("x", ["im00.png", "im01.jpg"]),
                                ("z", ["im00.png", "im01.jpg", "im02.png"])) for f in fs]
  # no val/: train and val are cut from train/ per class by val_fraction
  train = folders.read_class_folders(str(root), "train", val_fraction=0.5)
  val = folders.read_class_folders(str(root), "val", val_fraction=0.5)
  assert (len(train), len(val)) == (7, 8)  # x 3+3, y 2+2, z 2+3 (5 * 0.5 rounds up)
  assert not {bytes(b) for b in train.images} & {bytes(b) for b in val.images}
  assert sorted(map(bytes, [*train.images, *val.images])) == sorted(
      file_bytes(root / "train" / c / f) for c in "xyz" for f in os.listdir(root / "train" / c))
  assert len(folders.read_class_folders(str(root), "train", val_fraction=0.0)) == 15
  # with val/: the folders are the splits as they are
  make_classes(root / "val", {"y": 2})
  assert len(folders.read_class_folders(str(root), "train")) == 15
  val = folders.read_class_folders(str(root), "val")
  assert list(val.labels) == [1, 1]
  make_classes(root / "test", {"w": 1})
  with pytest.raises(ValueError, match=pat(root / "test") + r": class folder\(s\) w not in"):
    folders.read_class_folders(str(root), "test")
  only = tmp_path / "only_train"
  make_classes(only / "train", {"x": 2})
  with pytest.raises(ValueError, match=pat(only) + ": has train/ but no test/"):
    folders.read_class_folders(str(only), "train")


def test_gif_and_bmp_are_images_too(tmp_path):
  root = tmp_path / "formats"
  write_image(root / "a" / "x.gif", 1, "GIF")
  write_image(root / "a" / "y.BMP", 2, "BMP")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    s = folders.read_class_folders(str(root), "train", val_fraction=0.0)
  assert list(s.images) == [file_bytes(root / "a" / "x.gif"), file_bytes(root / "a" / "y.BMP")]
  assert s.images[0].startswith(b"GIF8") and s.images[1].startswith(b"BM")
