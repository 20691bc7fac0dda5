"""ADE20K sources (official folder layout, tfds scene_parse150 mock data) and the SETR pipeline."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from vpt_jax.data import ade20k

# 151 distinct colours: the image of a "label is a function of the pixel" example.
LUT = np.stack([np.arange(151) * 1, (np.arange(151) * 7) % 256, (np.arange(151) * 13) % 256],
               axis=1).astype(np.uint8)
INV = {tuple(c): k for k, c in enumerate(LUT)}


def block_labels(h, w, seed, block=8, low=1, high=151):
  rng = np.random.default_rng(seed)
  cells = rng.integers(low, high, size=(-(-h // block), -(-w // block)))
  return np.kron(cells, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)


def write_folder(root, split, n=3):
  labels = []
  for sub in ("images", "annotations"):
    os.makedirs(os.path.join(root, sub, split), exist_ok=True)
  for i in range(n):
    label = block_labels(24 + 8 * i, 40, seed=i, low=0, high=151)
    label[0, 0], label[0, 1] = 0, 150  # both ends of the range in every file
    Image.fromarray(LUT[label]).save(os.path.join(root, "images", split, f"ADE_{i:03d}.jpg"))
    Image.fromarray(label).save(os.path.join(root, "annotations", split, f"ADE_{i:03d}.png"))
    labels.append(label)
  return labels


def reduced(label):
  label = label.astype(np.int64)
  return np.where(label == 0, 255, label - 1)


def test_reduce_zero_label():
  raw = tf.constant([0, 1, 2, 150, 255], tf.uint8)
  np.testing.assert_array_equal(ade20k.reduce_zero_label(raw), [255, 0, 1, 149, 255])


def test_official_folder_layout_loads_with_reduced_labels(tmp_path):
  root = str(tmp_path / "ADEChallengeData2016")
  want = write_folder(root, "training")
  write_folder(root, "validation", n=1)
  raw = list(ade20k.folder_dataset(root, "train").as_numpy_iterator())
  assert len(raw) == 3
  for ex, label in zip(raw, want):
    assert ex["image"].shape == label.shape + (3,) and ex["image"].dtype == np.uint8
    np.testing.assert_array_equal(ex["label"], label)  # PNG: lossless
  ev = list(ade20k.eval_dataset(ade20k.folder_dataset(root, "validation")).as_numpy_iterator())
  assert len(ev) == 1
  np.testing.assert_array_equal(ev[0]["label"], reduced(want[0][:24]))
  assert ev[0]["label"].max() == 255 and ev[0]["label"][0, 1] == 149
  # Keep-ratio test resize: 24x40 to fit (2048, 512): f = min(2048 / 40, 512 / 24) = 21.33.
  assert ev[0]["image"].shape == (512, 853, 3)
  assert -1.0 <= ev[0]["image"].min() and ev[0]["image"].max() <= 1.0


def test_folder_errors_name_what_is_missing(tmp_path):
  root = str(tmp_path / "ade")
  with pytest.raises(FileNotFoundError, match="missing directory"):
    ade20k.folder_pairs(root, "training")
  write_folder(root, "training", n=2)
  os.remove(os.path.join(root, "annotations", "training", "ADE_001.png"))
  with pytest.raises(FileNotFoundError, match="ADE_001.jpg.*no annotation"):
    ade20k.folder_pairs(root, "training")
  with pytest.raises(ValueError, match="split 'test'"):
    ade20k.folder_pairs(root, "test")


def test_label_above_150_is_an_error_naming_the_source(tmp_path):
  root = str(tmp_path / "ade")
  write_folder(root, "training", n=1)
  path = os.path.join(root, "annotations", "training", "ADE_000.png")
  label = np.asarray(Image.open(path)).copy()
  label[3, 3] = 151
  Image.fromarray(label).save(path)
  with pytest.raises(tf.errors.InvalidArgumentError, match="ADE20K folder.*above 150"):
    list(ade20k.folder_dataset(root, "training"))


def test_tfds_scene_parse150_mock_data():
  """Random mock data has annotation values up to 255: the loader refuses them by name. With
  examples whose annotation channel 0 is a known label map, labels come out reduced."""
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(tf.errors.InvalidArgumentError, match="scene_parse150.*above 150"):
      list(ade20k.tfds_dataset("train"))

  labels = [block_labels(16, 24, seed=s, low=0, high=151) for s in range(3)]

  def as_dataset(self, *args, **kwargs):
    del args, kwargs
    def gen():
      for lab in labels:
        ann = np.stack([lab, np.full_like(lab, 200), np.full_like(lab, 7)], axis=-1)
        yield {"image": LUT[lab], "annotation": ann}
    return tf.data.Dataset.from_generator(
        gen, output_signature={k: tf.TensorSpec((None, None, 3), tf.uint8)
                               for k in ("image", "annotation")})

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    ev = list(ade20k.eval_dataset(ade20k.tfds_dataset("test")).as_numpy_iterator())
  assert len(ev) == 3
  for ex, lab in zip(ev, labels):
    np.testing.assert_array_equal(ex["label"], reduced(lab))


def decode(image):
  """Normalised [-1, 1] image -> per-pixel label via the colour table (-1 where no colour)."""
  rgb = np.round((image + 1.0) * 127.5).astype(np.int64)
  out = np.full(rgb.shape[:2], -1)
  for k, c in enumerate(LUT):
    out[(rgb == c).all(-1)] = k
  return out


@pytest.mark.parametrize("seed", range(6))
def test_crop_and_flip_keep_image_and_label_aligned(seed):
  label = block_labels(64, 96, seed)
  image = LUT[label]
  ex = ade20k.train_example(tf.constant(image), ade20k.reduce_zero_label(label),
                            tf.constant([3, seed], tf.int64), crop=(32, 48), scale=(96, 64),
                            ratio_range=(1.0, 1.0), photometric=False, cat_max_ratio=1.0)
  img, lab = ex["image"].numpy(), ex["label"].numpy()
  assert img.shape == (32, 48, 3) and lab.shape == (32, 48)
  np.testing.assert_array_equal(reduced(decode(img)), lab)
  # The crop is a window of the original, possibly mirrored.
  windows = [label[y:y + 32, x:x + 48] for y in range(33) for x in range(49)]
  raw = decode(img)
  assert any((w == raw).all() or (w[:, ::-1] == raw).all() for w in windows)


def test_flip_happens_about_half_the_time():
  label = block_labels(32, 32, 0)
  image = LUT[label]
  flips = 0
  for s in range(40):
    ex = ade20k.train_example(tf.constant(image), ade20k.reduce_zero_label(label),
                              tf.constant([0, s], tf.int64), crop=(32, 32), scale=(32, 32),
                              ratio_range=(1.0, 1.0), photometric=False, cat_max_ratio=1.0)
    raw = decode(ex["image"].numpy())
    assert (raw == label).all() or (raw == label[:, ::-1]).all()
    flips += int((raw == label[:, ::-1]).all() and not (raw == label).all())
  assert 10 <= flips <= 30


@pytest.mark.parametrize("seed", range(4))
def test_random_resize_image_bilinear_label_nearest(seed):
  """Away from block borders, the resized image's colour still names the resized label."""
  label = block_labels(64, 96, seed)
  image = LUT[label]
  img, lab = ade20k.random_resize(tf.constant(image), tf.constant(label, tf.int32),
                                  tf.constant([1, seed], tf.int64), scale=(96, 64),
                                  ratio_range=(0.5, 2.0))
  img, lab = img.numpy(), lab.numpy()
  assert set(np.unique(lab)) <= set(np.unique(label))  # nearest: no new class ids
  h, w = lab.shape
  assert abs(h / w - 64 / 96) < 0.05 and 32 <= h <= 128
  rgb = np.round(img).astype(np.int64)
  interior = np.ones_like(lab, bool)
  for dy in (-1, 0, 1):
    for dx in (-1, 0, 1):
      interior[1:-1, 1:-1] &= lab[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx] == lab[1:-1, 1:-1]
  interior[[0, -1]] = interior[:, [0, -1]] = False
  assert interior.mean() > 0.3
  np.testing.assert_array_equal(rgb[interior], LUT[lab[interior]])


def crop_ok(lab, ratio=0.75):
  v = lab[lab != 255]
  counts = np.bincount(v)
  return (counts > 0).sum() > 1 and counts.max() < ratio * counts.sum()


def test_cat_max_ratio_retries_crops():
  # 32x64 map: class 0 in columns 0..39, class 1 after; a 32x32 crop at column x passes iff
  # 17 <= x <= 31 (15 of the 33 offsets).
  label = np.zeros((32, 64), np.int32)
  label[:, 40:] = 1
  image = tf.zeros((32, 64, 3))
  ok = {r: [crop_ok(ade20k.random_crop(image, tf.constant(label), tf.constant([5, s], tf.int64),
                                       crop=(32, 32), cat_max_ratio=r)[1].numpy())
            for s in range(20)] for r in (0.75, 1.0)}
  assert all(ok[0.75])
  assert not all(ok[1.0])


def test_photometric_distortion_range_and_determinism():
  image = tf.constant(LUT[block_labels(16, 16, 0)], tf.float32)
  outs = [ade20k.photometric_distortion(image, tf.constant([0, s], tf.int64)).numpy()
          for s in range(8)]
  again = ade20k.photometric_distortion(image, tf.constant([0, 3], tf.int64)).numpy()
  np.testing.assert_array_equal(outs[3], again)
  assert all(0.0 <= o.min() and o.max() <= 255.0 for o in outs)
  changed = [np.abs(o - image.numpy()).max() > 1.0 for o in outs]
  assert any(changed)
  assert len({o.tobytes() for o in outs}) > 4


def test_train_dataset_batches_pad_small_crops():
  labels = [block_labels(20, 24, s) for s in range(3)]
  raw = tf.data.Dataset.from_generator(
      lambda: ({"image": LUT[l], "label": l} for l in labels),
      output_signature={"image": tf.TensorSpec((None, None, 3), tf.uint8),
                        "label": tf.TensorSpec((None, None), tf.uint8)})
  ds = ade20k.train_dataset(raw, batch_size=2, seed=0, crop=(32, 32), scale=(24, 20),
                            ratio_range=(1.0, 1.0))
  batch = next(iter(ds))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["label"].shape == (2, 32, 32)
  lab = batch["label"].numpy()
  assert (lab[:, 20:] == 255).all() and (lab[:, :, 24:] == 255).all()
  assert (batch["image"].numpy()[:, 20:] == 0).all()
  assert (lab[:, :20, :24] < 150).all()
  with pytest.raises(ValueError, match="normalization='bad'"):
    ade20k.normalize(tf.zeros((2, 2, 3)), "bad")
