"""The VTAB-1k task table: split arithmetic, label transforms, every task through tfds mock data."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vpt_jax.data import sources, vtab

# The split strings of the VPT code's VTAB-1k tables, written out (independent of `vtab._at`).
EXPECTED = {
    "caltech101": ("train[:800]", "train[2754:2954]", "test"),
    "cifar100": ("train[:800]", "train[45000:45200]", "test"),
    "dtd": ("train[:800]", "validation[:200]", "test"),
    "oxford_flowers102": ("train[:800]", "validation[:200]", "test"),
    "oxford_iiit_pet": ("train[:800]", "train[2944:3144]", "test"),
    "svhn": ("train[:800]", "train[65931:66131]", "test"),
    "sun397": ("train[:800]", "validation[:200]", "test"),
    "patch_camelyon": ("train[:800]", "validation[:200]", "test"),
    "eurosat": ("train[:800]", "train[16200:16400]", "train[21600:]"),
    "resisc45": ("train[:800]", "train[18900:19100]", "train[25200:]"),
    "diabetic_retinopathy": ("train[:800]", "validation[:200]", "test"),
    "clevr_count": ("train[:800]", "train[63000:63200]", "validation"),
    "clevr_distance": ("train[:800]", "train[63000:63200]", "validation"),
    "dmlab": ("train[:800]", "validation[:200]", "test"),
    "kitti_distance": ("train[:800]", "validation[:200]", "test"),
    "dsprites_location": ("train[:800]", "train[589824:590024]", "train[663552:]"),
    "dsprites_orientation": ("train[:800]", "train[589824:590024]", "train[663552:]"),
    "smallnorb_azimuth": ("train[:800]", "test[:200]", "test[50%:]"),
    "smallnorb_elevation": ("train[:800]", "test[:200]", "test[50%:]"),
}
CLASSES = {"caltech101": 102, "cifar100": 100, "dtd": 47, "oxford_flowers102": 102,
           "oxford_iiit_pet": 37, "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10,
           "resisc45": 45, "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_distance": 6,
           "dmlab": 6, "kitti_distance": 4, "dsprites_location": 16, "dsprites_orientation": 16,
           "smallnorb_azimuth": 18, "smallnorb_elevation": 9}


def test_nineteen_tasks_in_three_groups():
  assert sorted(vtab.TASKS) == sorted(EXPECTED)
  counts = {g: sum(t.group == g for t in vtab.TASKS.values()) for g in vtab.GROUPS}
  assert counts == {"natural": 7, "specialized": 4, "structured": 8}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_split_arithmetic(name):
  t = vtab.TASKS[name]
  assert (t.train800, t.val200, t.test) == EXPECTED[name]
  assert t.split("train800val200") == f"{EXPECTED[name][0]}+{EXPECTED[name][1]}"
  assert t.num_classes == CLASSES[name]
  with pytest.raises(ValueError, match="VTAB split 'train1000'"):
    t.split("train1000")


def test_label_transforms():
  f = vtab.LABEL_TRANSFORMS
  objs = lambda depths: {"objects": {"size": np.zeros(len(depths)),
                                     "pixel_coords": np.array([[0, 0, d] for d in depths], float)}}
  assert f["clevr_count"](objs([9.0] * 3)) == 0 and f["clevr_count"](objs([9.0] * 10)) == 7
  assert f["clevr_distance"](objs([12.0, 8.2, 9.7])) == 1      # closest 8.2: in (8, 8.5]
  assert f["clevr_distance"](objs([8.0])) == 0                 # thresholds are strict
  assert f["clevr_distance"](objs([10.5, 50.0])) == 5
  kitti = lambda types, z: {"objects": {"type": np.array(types),
                                        "location": np.array([[0, 0, d] for d in z], float)}}
  assert f["kitti_distance"](kitti([], [])) == 3                 # no vehicle: the 1000 sentinel
  assert f["kitti_distance"](kitti([3, 0], [2.0, 5.0])) == 0     # pedestrian ignored, car at 5m
  assert f["kitti_distance"](kitti([1], [15.0])) == 1
  assert f["kitti_distance"](kitti([2, 6], [25.0, 1.0])) == 2    # tram ignored
  assert [f["dsprites_location"]({"label_x_position": x}) for x in (0, 1, 2, 31)] == [0, 0, 1, 15]
  assert [f["dsprites_orientation"]({"label_orientation": o}) for o in (0, 2, 3, 39)] == [
      0, 0, 1, 15]
  with pytest.raises(ValueError, match="data.label_transform='count'"):
    vtab.label_transform("count")


def _stand_in(kind):
  """tfds' mock data cannot build clevr/kitti object lists or valid pet bounding boxes; this
  stands in for those builders with the features the task reads."""
  rng = np.random.default_rng(0)
  png = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()

  def examples():
    for _ in range(12):
      k = int(rng.integers(3, 11))
      if kind == "clevr":
        yield {"image": png, "objects": {
            "size": rng.integers(0, 2, k), "pixel_coords": rng.uniform(5, 15, (k, 3))}}
      elif kind == "kitti":
        yield {"image": png, "objects": {
            "type": rng.integers(0, 8, k), "location": rng.uniform(-5, 40, (k, 3))}}
      else:
        yield {"image": png, "label": rng.integers(0, 37)}
  if kind == "pets":
    sig = {"image": tf.TensorSpec((), tf.string), "label": tf.TensorSpec((), tf.int64)}
  else:
    keys = ("size", "pixel_coords") if kind == "clevr" else ("type", "location")
    sig = {"image": tf.TensorSpec((), tf.string), "objects": {
        keys[0]: tf.TensorSpec((None,), tf.int64), keys[1]: tf.TensorSpec((None, 3), tf.float64)}}
  return lambda *args, **kwargs: tf.data.Dataset.from_generator(examples, output_signature=sig)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_task_loads_through_tfds(name):
  """Mock examples with each builder's real features; mock data ignores slicing, so sizes are
  the mock's, while the label ranges and transforms are the task's."""
  t = vtab.TASKS[name]
  cfg = sources.default_config()
  cfg.update(dict(source="tfds", name=t.builder, num_classes=t.num_classes,
                  label_key=t.label_key, label_transform=t.label_transform))
  kind = {"clevr_count": "clevr", "clevr_distance": "clevr", "kitti_distance": "kitti",
          "oxford_iiit_pet": "pets"}.get(name)
  mock = dict(as_dataset_fn=_stand_in(kind)) if kind else {}
  with tfds.testing.mock_data(num_examples=12, **mock):
    splits = sources.load_splits(cfg, [t.train800, t.val200, t.test])
  for s in splits.values():
    assert len(s) == 12 and s.encoded
    assert s.labels.min() >= 0 and s.labels.max() < t.num_classes


def test_unreadable_tfds_images_fail_or_are_skipped_with_a_count():
  good = tf.io.encode_png(np.zeros((8, 8, 3), np.uint8)).numpy()

  def as_dataset(*args, **kwargs):
    images = [good, b"not an image", good, b"\x00\x01"]
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": [0, 1, 2, 3]})
  cfg = sources.default_config()
  cfg.update(dict(source="tfds", name="cifar100:3.*.*", num_classes=10))
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    with pytest.raises(ValueError, match=r"example 1 is not a JPEG/PNG/GIF/BMP image \(2 such\)"):
      sources.load_splits(cfg, ["train"])
    cfg.on_bad_image = "skip"
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\), examples \[1, 3\]"):
      split = sources.load_splits(cfg, ["train"])["train"]
  assert list(split.labels) == [0, 2]
  cfg.on_bad_image = "ignore"
  with pytest.raises(ValueError, match="data.on_bad_image='ignore'"):
    sources.load_splits(cfg, ["train"])


# Each builder's stored image (tfds feature spec): (height, width, channels, largest pixel value).
# dSprites stores {0, 1} in one channel; smallNORB one channel 0..255; the rest RGB 0..255.
STORED = {name: (8, 8, 3, 255) for name in EXPECTED}
STORED.update({n: (8, 8, 1, 1) for n in ("dsprites_location", "dsprites_orientation")})
STORED.update({n: (8, 8, 1, 255) for n in ("smallnorb_azimuth", "smallnorb_elevation")})


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_tasks_preprocessed_images_span_the_model_range(name):
  """A mock image holding the builder's smallest and largest stored values, through the task's
  config: the model input must be 3 channels spanning [-1, 1] (task_adaptation: dSprites x 255,
  grayscale tiled to RGB)."""
  from configs import vtab as vtab_config
  from vpt_jax.data import pipeline
  h, w, ch, top = STORED[name]
  image = np.zeros((h, w, ch), np.uint8)
  image[:, w // 2:] = top
  png = tf.io.encode_png(image).numpy()

  def as_dataset(*args, **kwargs):
    return tf.data.Dataset.from_tensor_slices({"image": [png], "label": [0]})
  c = vtab_config.get_config(name)
  c.data.label_transform, c.data.label_key = "", "label"
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    split = sources.load_splits(c.data, [c.data.train_split])[c.data.train_split]
  pre = pipeline.make_preprocess(c.data, 16, train=False)
  x = pre(tf.constant(split.images[0]), tf.zeros(2, tf.int64))
  x = np.asarray(x)
  assert x.shape == (16, 16, 3)
  np.testing.assert_allclose([x.min(), x.max()], [-1.0, 1.0], atol=1e-5)
