"""Cached frozen prefixes: where the model is entered, and that caching changes no result."""

import jax
import numpy as np
import pytest

import vpt_jax
from configs import demo
from vpt_jax.data import pipeline, sources
from vpt_jax.tuning import build, cache, loop

DEPTH = 4  # demo-vit


def config(protocol, **prompt):
  c = demo.get_config("linear")
  c.protocol = protocol
  c.prompt.update(prompt)
  c.model.num_classes = 10
  return c


def entry(protocol, **prompt):
  built = build.build(config(protocol, **prompt))
  return cache.entry_layer(built.model, built.mask)[0]


@pytest.mark.parametrize("protocol,prompt,layer", [
    ("linear", {}, DEPTH),
    ("mlp-2", {}, DEPTH),
    ("partial-1", {}, DEPTH - 1),
    ("partial-3", {}, DEPTH - 3),
    ("vpt", dict(length=4, deep=True, depth=2, reverse=True), DEPTH - 2),
    ("vpt", dict(length=4, deep=True), 0),
    ("vpt", dict(length=4, deep=False), 0),
    ("linear", dict(length=4, deep=True, depth=1, reverse=True), DEPTH - 1),  # frozen prompts count
    ("full", {}, 0),
    ("bias", {}, 0),
    ("adapter", {}, 0),
    ("side", {}, -1),
])
def test_entry_layer_follows_the_trainable_mask_and_the_hooks(protocol, prompt, layer):
  assert entry(protocol, **prompt) == layer


def test_plan_names_every_obstacle():
  built = build.build(config("linear"))
  ok = cache.plan(built.model, built.mask, mode="auto", deterministic=True, num_examples=10)
  assert ok.layer == DEPTH and "layer 4" in cache.describe(ok, DEPTH)
  aug = cache.plan(built.model, built.mask, mode="auto", deterministic=False)
  assert aug.layer == 0 and "random augmentation" in aug.reason
  assert cache.plan(built.model, built.mask, mode=False, deterministic=True).layer == 0
  with pytest.raises(ValueError, match="cache_features=True, but .*random augmentation"):
    cache.plan(built.model, built.mask, mode=True, deterministic=False)
  with pytest.raises(ValueError, match="dropout 0.1"):
    cache.plan(built.model.clone(dropout=0.1), built.mask, mode="true", deterministic=True)
  with pytest.raises(ValueError, match="GiB"):
    cache.plan(built.model, built.mask, mode="true", deterministic=True,
                  num_examples=10 ** 7)
  side = build.build(config("side"))
  with pytest.raises(ValueError, match="side network reads the images"):
    cache.plan(side.model, side.mask, mode="true", deterministic=True)
  adapter = build.build(config("adapter"))
  with pytest.raises(ValueError, match="layer 0 is not frozen \\(adapters\\)"):
    cache.plan(adapter.model, adapter.mask, mode="true", deterministic=True)


def test_token_pipeline_keeps_the_pipelines_order():
  cfg = config("linear").data
  split = sources.load_splits(cfg, ["val200"])["val200"]
  pipe = pipeline.Pipeline(split, pipeline.make_preprocess(cfg, 32, train=True), batch_size=64,
                           seed=3)
  tokens = np.arange(len(split), dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32)
  cached = cache.TokenPipeline(pipe, tokens)
  a, b = pipe.train_batches(2), cached.train_batches(2)  # from step 2, across an epoch boundary
  for _ in range(5):
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["label"], y["label"])
    index = y["image"][:, 0, 0].astype(int)
    np.testing.assert_array_equal(split.labels[index], y["label"])
    np.testing.assert_allclose(x["image"], pipe._cached.numpy()[index])
  evals = list(cached.eval_batches())
  assert [e["mask"].sum() for e in evals] == [64, 64, 64, 8]


TINY_DEPTH = 2  # tiny-random: the training runs below compile half the layers of demo-vit


@pytest.mark.parametrize("protocol,prompt,layer", [
    ("linear", {}, TINY_DEPTH),
    ("partial-1", {}, TINY_DEPTH - 1),
    ("vpt", dict(length=4, deep=True, depth=1, reverse=True), TINY_DEPTH - 1),
])
def test_cached_and_uncached_training_agree(tmp_path, capsys, protocol, prompt, layer):
  """Same final trainable leaves and metrics; only the cached run logs the cached path."""
  out = {}
  for mode in ("false", "true"):
    c = config(protocol, **prompt)
    c.model.checkpoint = "tiny-random"
    c.model.num_classes = 0
    c.cache_features = mode
    c.optim.epochs, c.optim.warmup_epochs, c.optim.lr = 2, 1, 0.25
    c.data.val_split, c.data.test_split, c.eval_every_epochs = "", "val200", 0
    c.data.train_split = "train800[:200]"  # equality of the two paths needs no more
    workdir = str(tmp_path / mode)
    results = loop.train_and_evaluate(c, workdir)
    _, variables = vpt_jax.load_tuned(workdir, which="last")
    out[mode] = (results, variables, capsys.readouterr().out)
  (r0, v0, log0), (r1, v1, log1) = out["false"], out["true"]
  assert r0["cached_features_layer"] is None and r1["cached_features_layer"] == layer
  assert "cached features: not used" not in log1 and f"enter at layer {layer}" in log1
  assert "cached features: off" in log0
  assert r1["test_top1"] == r0["test_top1"]
  assert r1["test_loss"] == pytest.approx(r0["test_loss"], rel=1e-5)
  # Two programs that sum in different orders, two epochs at lr 0.25: float32 rounding of leaves
  # of scale ~1 (the run that trains nothing, or wrongly, is caught by the check below).
  for a, b in zip(jax.tree.leaves(v1), jax.tree.leaves(v0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  c = config(protocol, **prompt)
  c.model.checkpoint = "tiny-random"
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(v1), jax.tree.leaves(build.build(c).variables)))


def test_prefix_in_chunks_equals_the_whole_batch():
  """The cached prefix computed in chunks of images (`microbatch_size`, automatic on CPUs) is the
  whole batch's, row for row and in order."""
  built = build.build(config("vpt", length=2, deep=True))
  images = np.random.default_rng(0).uniform(-1, 1, (12, 32, 32, 3)).astype(np.float32)
  whole = np.asarray(cache.prefix_fn(built.model, 2)(built.variables, images))
  for mb in (4, 5):  # 3 chunks of 4 rows each time
    got = np.asarray(cache.prefix_fn(built.model, 2, microbatch=mb)(built.variables, images))
    assert got.shape == whole.shape == (12, whole.shape[1], built.model.width)
    np.testing.assert_allclose(got, whole, atol=1e-5, rtol=1e-5)
