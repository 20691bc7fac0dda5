"""Data: sources, the (seed, step)-deterministic pipeline, preprocessing, the shapes task."""

import numpy as np
import pytest
import tensorflow as tf

from vpt_jax.data import pipeline, shapes, sources
from vpt_jax.data.sources import Split


def cfg(**kw):
  c = sources.default_config()
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def digits():
  return sources.load_splits(cfg(), ["train800", "val200", "train800val200", "test"])


def test_digits_splits_are_vtab_like_and_disjoint(digits):
  assert [len(digits[s]) for s in ("train800", "val200", "train800val200", "test")] == [
      800, 200, 1000, 797]
  np.testing.assert_array_equal(
      digits["train800val200"].images,
      np.concatenate([digits["train800"].images, digits["val200"].images]))
  assert len(digits["train800val200"]) + len(digits["test"]) == 1797  # one permutation, cut once
  assert digits["train800"].images.dtype == np.uint8 and digits["train800"].images.max() == 255
  assert set(digits["test"].labels) == set(range(10))


def test_digits_splits_slice_like_tfds_split_strings(digits):
  """`name[a:b]` takes those rows of the named split, in its order (the tests' quick runs)."""
  got = sources.load_splits(cfg(), ["train800[:256]", "test[100:]", "val200[10:20]"])
  for name, base, rows in (("train800[:256]", "train800", slice(None, 256)),
                           ("test[100:]", "test", slice(100, None)),
                           ("val200[10:20]", "val200", slice(10, 20))):
    np.testing.assert_array_equal(got[name].images, digits[base].images[rows])
    np.testing.assert_array_equal(got[name].labels, digits[base].labels[rows])
  assert len(got["test[100:]"]) == 697
  for bad in ("train900", "train800[:x]", "train800[256]"):
    with pytest.raises(ValueError, match=r"digits source has train800.*sliced as name\[a:b\]"):
      sources.load_splits(cfg(), [bad])


def test_digits_are_scikit_learns_digits_in_a_fixed_order(digits):
  """The demo reads scikit-learn's data file directly (no sklearn import in training processes):
  the same images and labels as `load_digits`, permuted by the fixed seed-0 permutation."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  order = np.random.default_rng(0).permutation(len(d.target))
  for split, (lo, hi) in sources.DIGITS_SPLITS.items():
    idx = order[lo:hi]
    np.testing.assert_array_equal(digits[split].labels, d.target[idx])
    np.testing.assert_array_equal(
        digits[split].images[..., 0], np.round(d.images[idx] * (255.0 / 16.0)).astype(np.uint8))


def test_source_errors_name_the_option():
  with pytest.raises(ValueError, match="data split 'train1000'"):
    sources.load_splits(cfg(), ["train1000"])
  with pytest.raises(ValueError, match="data.source='kaggle'"):
    sources.load_splits(cfg(source="kaggle"), ["train800"])
  with pytest.raises(ValueError, match=r"split 'train800': label \d is outside 0..4 \(num_classes=5\)"):
    sources.load_splits(cfg(num_classes=5), ["train800"])
  with pytest.raises(FileNotFoundError, match=r"data.name='no_such_dataset'.*tfds build"):
    sources.load_splits(cfg(source="tfds", name="no_such_dataset", num_classes=3),
                        ["train[:10]"])


def _pipe(split, batch=16, seed=0, index=0, count=1, train=True, **kw):
  pre = pipeline.make_preprocess(cfg(**kw), 32, train=train)
  return pipeline.Pipeline(split, pre, batch_size=batch, seed=seed, process_index=index,
                           process_count=count)


def test_training_order_is_a_function_of_seed_and_step(digits):
  split = digits["train800"]
  p = _pipe(split)
  it = p.train_batches(0)
  first = [next(it) for _ in range(60)]  # crosses an epoch boundary (50 steps per epoch)
  for start in (0, 7, 49, 50, 55):
    np.testing.assert_array_equal(next(_pipe(split).train_batches(start))["image"],
                                  first[start]["image"])
  epoch0 = np.concatenate([b["label"] for b in first[:50]])
  assert sorted(epoch0) == sorted(split.labels)  # an epoch visits every example once
  other = next(_pipe(split, seed=1).train_batches(0))
  assert not np.array_equal(other["label"], first[0]["label"])
  assert not np.array_equal(first[50]["label"], first[0]["label"])


def test_hosts_get_disjoint_rows_of_each_global_batch(digits):
  split = digits["train800"]
  whole = next(_pipe(split).train_batches(3))
  parts = [next(_pipe(split, index=i, count=4).train_batches(3)) for i in range(4)]
  np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])
  with pytest.raises(ValueError, match="not divisible by 3 hosts"):
    _pipe(split, count=3)


def test_eval_pass_is_in_order_and_masks_the_padding(digits):
  split = digits["test"]
  batches = list(_pipe(split, batch=64, train=False).eval_batches())
  labels = np.concatenate([b["label"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert len(labels) == 13 * 64 and mask.sum() == 797
  np.testing.assert_array_equal(labels[:797], split.labels)


def test_preprocessing_ranges_and_crops():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  encoded = tf.io.encode_png(img).numpy()
  seed = tf.constant([0, 1], tf.int64)
  x = pipeline.make_preprocess(cfg(), 32, train=False)(tf.constant(img), seed).numpy()
  assert x.shape == (32, 32, 3) and x.min() >= -1 and x.max() <= 1
  same = pipeline.make_preprocess(cfg(), 32, train=False)(tf.constant(encoded), seed).numpy()
  np.testing.assert_allclose(x, same, atol=1e-6)  # bytes are decoded to the same pixels
  imnet = pipeline.make_preprocess(cfg(normalization="imagenet"), 32, False)(tf.constant(img),
                                                                             seed).numpy()
  np.testing.assert_allclose(imnet[..., 0], ((x[..., 0] + 1) / 2 - 0.485) / 0.229, atol=1e-5)
  crop = pipeline.make_preprocess(cfg(crop="resize_crop", resize_size=40), 32, train=True)
  a, b = crop(tf.constant(img), seed).numpy(), crop(tf.constant(img), seed).numpy()
  c = crop(tf.constant(img), tf.constant([0, 2], tf.int64)).numpy()
  assert a.shape == (32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
  center = pipeline.make_preprocess(cfg(crop="resize_crop", resize_size=40), 32, train=False)
  assert center(tf.constant(img), seed).numpy().shape == (32, 32, 3)
  with pytest.raises(ValueError, match="data.resize_size=16"):
    pipeline.make_preprocess(cfg(crop="resize_crop", resize_size=16), 32, True)
  with pytest.raises(ValueError, match="data.normalization='zscore'"):
    pipeline.make_preprocess(cfg(normalization="zscore"), 32, True)


def test_batch_larger_than_the_split_is_one_padded_batch():
  split = Split(np.zeros((10, 8, 8, 1), np.uint8), np.zeros(10, np.int32))
  p = _pipe(split, batch=16)
  batch = next(p.train_batches(0))
  assert p.steps_per_epoch == 1 and batch["mask"].sum() == 10 and len(batch["mask"]) == 16


@pytest.mark.parametrize("n,batch", [(100, 16), (96, 16), (5, 4)])
def test_every_example_is_seen_once_per_epoch_in_ceil_n_over_batch_steps(n, batch):
  """The official loader keeps the partial last batch: ceil(n / batch) steps, each example once
  per epoch (padding rows carry mask 0); resuming mid-epoch replays the same batches."""
  images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 1), np.uint8)
  split = Split(images, np.arange(n, dtype=np.int32))
  p = _pipe(split, batch=batch)
  spe = -(-n // batch)
  assert p.steps_per_epoch == spe
  it = p.train_batches(0)
  for _ in range(2):  # two epochs
    seen = []
    for _ in range(spe):
      b = next(it)
      assert len(b["label"]) == batch
      seen += list(b["label"][b["mask"] > 0])
    assert sorted(seen) == list(range(n))
  last = next(_pipe(split, batch=batch).train_batches(2 * spe - 1))
  np.testing.assert_array_equal(last["mask"], b["mask"])
  np.testing.assert_array_equal(last["label"], b["label"])


def test_shapes_task_is_deterministic_balanced_and_distinct():
  x, y = shapes.make_shapes(280, seed=3)
  x2, y2 = shapes.make_shapes(280, seed=3)
  assert x.shape == (280, 32, 32, 3) and x.dtype == np.uint8
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)
  assert not np.array_equal(shapes.make_shapes(280, seed=4)[0], x)
  counts = np.bincount(y, minlength=len(shapes.SHAPE_CLASSES))
  assert counts.min() == counts.max() == 280 // len(shapes.SHAPE_CLASSES)
  # Each class draws something: the foreground differs from the background in every image.
  assert (x.reshape(280, -1, 3).std(axis=1).max(axis=1) > 10).all()


def test_cached_preprocessing_equals_the_uncached_path(digits):
  split = digits["train800"]
  pre = pipeline.make_preprocess(cfg(), 32, train=True)
  assert pre.deterministic
  cached = pipeline.Pipeline(split, pre, batch_size=16, seed=0)
  plain = pipeline.Pipeline(split, pre, batch_size=16, seed=0, cache_bytes=0)
  assert cached._cached is not None and plain._cached is None
  for _, a, b in zip(range(10), cached.train_batches(45), plain.train_batches(45)):  # crosses epoch 1
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  ev = [list(p.eval_batches()) for p in (cached, plain)]
  for a, b in zip(*ev):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not pipeline.make_preprocess(cfg(crop="resize_crop", resize_size=40), 32,
                                      train=True).deterministic


def test_seeded_holdout_of_train(digits):
  c = cfg(val_split="holdout", holdout_fraction=0.25)
  out = sources.load_splits(c, ["train800", "holdout"])
  assert (len(out["train800"]), len(out["holdout"])) == (600, 200)
  rows = lambda s: {(r.tobytes(), int(l)) for r, l in zip(s.images, s.labels)}
  whole = rows(digits["train800"])
  assert rows(out["train800"]) | rows(out["holdout"]) == whole
  again = sources.load_splits(c, ["train800", "holdout"])
  assert rows(again["holdout"]) == rows(out["holdout"])
  other = sources.load_splits(cfg(val_split="holdout", holdout_fraction=0.25, holdout_seed=1),
                              ["holdout"])
  assert rows(other["holdout"]) != rows(out["holdout"])
  with pytest.raises(ValueError, match="data.val_split='holdout'"):
    sources.load_splits(cfg(), ["holdout"])
