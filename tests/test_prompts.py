"""VPT prompts: every variant against the independent numpy ViT, exactness at p = 0, options."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import numpy_vit
import vpt_jax
from conftest import ATOL, RTOL, data_path, jit_apply, jit_init, load_io
from vpt_jax import prompts
from vpt_jax.models.vit import VisionTransformer
from vpt_jax.tuning import rules
from vpt_jax.weights.npz import Architecture

IMAGES = load_io("vitjax_token.io.npz")["images"]
LOGITS = load_io("vitjax_token.io.npz")["logits"]
BASE, BASE_VARS = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))  # cls token, 2 layers
P = 3  # prompt length used throughout


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def close(a, b):
  np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)


def config(**kw):
  cfg = prompts.default_config()
  cfg.length = P
  cfg.update(kw)
  return cfg


def build(base=BASE, seed=0, **kw):
  model = prompts.attach(base, config(**kw))
  return model, prompts.init_prompts(model, jax.random.PRNGKey(seed))


def apply(model, params, pr, images=IMAGES, **kw):
  return np.asarray(jit_apply(model, {"params": params, "prompts": pr}, images, **kw))


def bcast(t, b=4):
  t = np.asarray(t, np.float64)
  return np.broadcast_to(t, (b,) + t.shape[-2:])


def put(tokens, k=1, replace=0):
  """numpy: insert `tokens` after k prefix tokens, replacing `replace` existing prompt tokens."""
  return lambda x: np.concatenate([x[:, :k], bcast(tokens, x.shape[0]), x[:, k + replace:]], 1)


def drop(n, k=1):
  return lambda x: np.concatenate([x[:, :k], x[:, k + n:]], 1)


REF = dict(patch=4, depth=2, pool="token", cls_row=True)


def tokens_of(pr):
  return np.asarray(pr["hooks"]["tokens"])


# ----------------------------------------------------------------------------------------------
# p = 0 is the plain ViT, exactly.


@pytest.mark.parametrize("kw", [dict(deep=True), dict(deep=False), dict(location="add"),
                                dict(location="concat-channel", deep=False),
                                dict(location="prepend-pixel", deep=False),
                                dict(pool="image"), dict(pool="cls")])
def test_zero_length_is_the_plain_vit(kw):
  model, pr = build(**(kw | {"length": 0}))
  assert rules.count(pr) == 0
  plain = np.asarray(jit_apply(BASE, BASE_VARS, IMAGES))
  got = apply(model, BASE_VARS["params"], pr)
  if kw.get("pool") == "image":  # a different readout by design: the mean of the patch outputs
    tok = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF, return_tokens=True)
    close(got, numpy_vit.head(flat(BASE_VARS["params"]), tok[:, 1:].mean(1)))
  else:
    np.testing.assert_array_equal(got, plain)
    close(got, LOGITS)


def test_zero_length_on_a_gap_backbone():
  base, variables = vpt_jax.load_pretrained(data_path("bigvision_gap.npz"))
  model, pr = build(base, length=0)
  np.testing.assert_array_equal(apply(model, variables["params"], pr),
                                np.asarray(jit_apply(base, variables, IMAGES)))
  close(apply(model, variables["params"], pr), load_io("bigvision_gap.io.npz")["logits"])


# ----------------------------------------------------------------------------------------------
# Shallow, deep, and the layer choices, against numpy.


def test_shallow_prompts_flow_through_all_layers():
  model, pr = build(deep=False)
  t = tokens_of(pr)
  assert t.shape == (1, P, 64)
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF, insert={0: put(t[0])})
  got = apply(model, BASE_VARS["params"], pr)
  close(got, expected)
  assert np.abs(got - LOGITS).max() > 1e-3


def test_deep_prompts_replace_the_previous_layers_outputs():
  model, pr = build(deep=True)
  t = tokens_of(pr)
  assert t.shape == (2, P, 64)
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                               insert={0: put(t[0]), 1: put(t[1], replace=P)})
  close(apply(model, BASE_VARS["params"], pr), expected)
  # Keeping the layer-0 prompt outputs (appending instead of replacing) gives something else.
  kept = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                           insert={0: put(t[0]), 1: put(t[1])})
  assert np.abs(kept - expected).max() > 1e-4


def test_deep_shared_reuses_one_set():
  model, pr = build(deep=True, shared=True)
  t = tokens_of(pr)
  assert t.shape == (1, P, 64)
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                               insert={0: put(t[0]), 1: put(t[0], replace=P)})
  close(apply(model, BASE_VARS["params"], pr), expected)


@pytest.fixture(scope="module")
def deep4():
  """A random 4-layer ViT (noise on the init, so no parameter is trivially zero or one)."""
  base = VisionTransformer(image_size=(32, 32), patch_size=(4, 4), width=64, depth=4, num_heads=4,
                           mlp_dim=128, num_classes=10, pool_type="token", class_token=True)
  params = jit_init(base, jax.random.PRNGKey(0), IMAGES[:1])["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: p + rng.normal(0, 0.1, p.shape).astype(np.float32), params)
  return base, params


@pytest.mark.parametrize("kw,insert", [
    (dict(depth=2), lambda t: {0: put(t[0]), 1: put(t[1], replace=P)}),
    (dict(depth=2, reverse=True), lambda t: {2: put(t[0]), 3: put(t[1], replace=P)}),
    (dict(depth=2, expand=False), lambda t: {0: put(t[0]), 1: put(t[1], replace=P), 2: drop(P)}),
    (dict(depth=1), lambda t: {0: put(t[0])}),
])
def test_first_and_last_k_layers_and_no_expand(deep4, kw, insert):
  base, params = deep4
  model, pr = build(base, deep=True, **kw)
  t = tokens_of(pr)
  expected = numpy_vit.forward(flat(params), IMAGES, patch=4, depth=4, pool="token",
                               cls_row=False, insert=insert(t))
  close(apply(model, params, pr), expected)


def test_prompted_layers():
  assert prompts.prompted_layers(12, deep=False) == (0,)
  assert prompts.prompted_layers(12, deep=True) == tuple(range(12))
  assert prompts.prompted_layers(12, deep=True, depth=3) == (0, 1, 2)
  assert prompts.prompted_layers(12, deep=True, depth=3, reverse=True) == (9, 10, 11)


# ----------------------------------------------------------------------------------------------
# Locations.


def test_add_one_prompt_per_token():
  model, pr = build(location="add", deep=True)
  t = tokens_of(pr)
  assert t.shape == (2, 65, 64)
  add = lambda v: (lambda x: x + np.asarray(v, np.float64))
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                               insert={0: add(t[0]), 1: add(t[1])})
  close(apply(model, BASE_VARS["params"], pr), expected)


def test_add_1_single_vector_for_all_tokens():
  model, pr = build(location="add-1", deep=False)
  t = tokens_of(pr)
  assert t.shape == (1, 1, 64)
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                               insert={0: lambda x: x + np.asarray(t[0], np.float64)})
  close(apply(model, BASE_VARS["params"], pr), expected)


def test_prepend_pixel_goes_through_the_frozen_patch_embedding():
  model, pr = build(location="prepend-pixel", deep=False)
  pixels = np.asarray(pr["hooks"]["pixels"])
  assert pixels.shape == (4, 4 * P, 3)
  p = flat(BASE_VARS["params"])
  tok = numpy_vit.embed_patches(p, pixels[None], 4)[0]  # (P, 64)
  expected = numpy_vit.forward(p, IMAGES, **REF, insert={0: put(tok)})
  close(apply(model, BASE_VARS["params"], pr), expected)


def test_pad_is_a_learnable_border():
  model, pr = build(location="pad", deep=False, length=2)
  h = pr["hooks"]
  inner = np.asarray(jax.image.resize(jnp.asarray(IMAGES), (4, 28, 28, 3), "bilinear"))
  b = lambda v: np.broadcast_to(np.asarray(v), (4,) + np.shape(v))
  mid = np.concatenate([b(h["pad_left"]), inner, b(h["pad_right"])], axis=2)
  padded = np.concatenate([b(h["pad_top"]), mid, b(h["pad_bottom"])], axis=1)
  assert padded.shape == IMAGES.shape
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), padded, **REF)
  close(apply(model, BASE_VARS["params"], pr), expected)
  assert rules.count(pr) == 2 * (2 * 32 * 3) + 2 * (28 * 2 * 3)


def test_concat_channel_adds_trainable_input_channels():
  model, pr = build(location="concat-channel", deep=False)
  # Zero extra kernel at init: the model starts as the plain ViT.
  np.testing.assert_array_equal(apply(model, BASE_VARS["params"], pr),
                                np.asarray(jit_apply(BASE, BASE_VARS, IMAGES)))
  kernel = np.random.default_rng(0).normal(0, 0.1, (4, 4, P, 64)).astype(np.float32)
  pr = {"hooks": pr["hooks"] | {"channel_kernel": kernel}}
  p = flat(BASE_VARS["params"])
  channels = np.asarray(pr["hooks"]["channels"])
  assert channels.shape == (32, 32, P)
  extra = numpy_vit.embed_patches({"embedding/kernel": kernel, "embedding/bias": np.zeros(64)},
                                  channels[None], 4)
  expected = numpy_vit.forward(p, IMAGES, **REF,
                               patch_tokens=numpy_vit.embed_patches(p, IMAGES, 4) + extra)
  close(apply(model, BASE_VARS["params"], pr), expected)


# ----------------------------------------------------------------------------------------------
# Pooled output, position invariance, projection, dropout, init.


@pytest.mark.parametrize("pool", ["original", "cls", "image", "prompt", "all"])
def test_pooled_output(pool):
  model, pr = build(deep=True, pool=pool)
  t = tokens_of(pr)
  p = flat(BASE_VARS["params"])
  tok = numpy_vit.forward(p, IMAGES, **REF, insert={0: put(t[0]), 1: put(t[1], replace=P)},
                          return_tokens=True)
  f = {"original": tok[:, 0], "cls": tok[:, 0], "image": tok[:, 1 + P:].mean(1),
       "prompt": tok[:, 1:1 + P].mean(1), "all": tok[:, 1:].mean(1)}[pool]
  close(apply(model, BASE_VARS["params"], pr), numpy_vit.head(p, f))


def test_original_pool_of_a_gap_backbone_ignores_prompts():
  base, variables = vpt_jax.load_pretrained(data_path("bigvision_gap.npz"))
  model, pr = build(base, deep=True)
  t = tokens_of(pr)
  p = flat(variables["params"])
  tok = numpy_vit.forward(p, IMAGES, patch=4, depth=2, pool="gap", cls_row=False,
                          insert={0: put(t[0], k=0), 1: put(t[1], k=0, replace=P)},
                          return_tokens=True)
  close(apply(model, variables["params"], pr), numpy_vit.head(p, tok[:, P:].mean(1)))


@pytest.mark.parametrize("deep", [False, True])
def test_prompt_position_does_not_matter(deep):
  """[x, P, E] and [x, E, P] give the same class-token output (prompts carry no posemb)."""
  model, pr = build(deep=deep)
  t = tokens_of(pr)
  at_end = lambda v, replace=0: (lambda x: np.concatenate(
      [x[:, :x.shape[1] - replace], bcast(v, x.shape[0])], 1))
  insert = {0: at_end(t[0])} | ({1: at_end(t[1], replace=P)} if deep else {})
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF, insert=insert)
  close(apply(model, BASE_VARS["params"], pr), expected)


def test_projection_from_a_smaller_dimension():
  model, pr = build(deep=True, project=8)
  h = pr["hooks"]
  assert h["tokens"].shape == (2, P, 8) and h["proj_kernel"].shape == (8, 64)
  proj = lambda v: np.asarray(v, np.float64) @ np.asarray(h["proj_kernel"]) + np.asarray(
      h["proj_bias"])
  t = h["tokens"]
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                               insert={0: put(proj(t[0])), 1: put(proj(t[1]), replace=P)})
  close(apply(model, BASE_VARS["params"], pr), expected)
  # kaiming-normal over fan-out (d = 64): std sqrt(2/64); bias torch's default U(+-1/sqrt(8));
  # the prompts' bound uses the projected dimension: sqrt(6 / (3 * 4 * 4 + 8)) (official).
  assert abs(np.std(np.asarray(h["proj_kernel"])) - math.sqrt(2 / 64)) < 0.05
  b = np.abs(np.asarray(h["proj_bias"]))
  assert b.max() <= 1 / math.sqrt(8) and b.max() > 0.8 / math.sqrt(8)
  v = math.sqrt(6.0 / (3 * 4 * 4 + 8))
  assert np.abs(np.asarray(t)).max() <= v and np.abs(np.asarray(t)).max() > 0.9 * v


def test_prompt_dropout_only_in_training():
  model, pr = build(deep=True, dropout=0.5)
  no_drop, _ = build(deep=True, dropout=0.0)
  eval_out = apply(model, BASE_VARS["params"], pr)
  np.testing.assert_array_equal(eval_out, apply(no_drop, BASE_VARS["params"], pr))
  r1 = apply(model, BASE_VARS["params"], pr, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  r1b = apply(model, BASE_VARS["params"], pr, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  r2 = apply(model, BASE_VARS["params"], pr, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
  np.testing.assert_array_equal(r1, r1b)
  assert np.abs(r1 - eval_out).max() > 1e-4 and np.abs(r1 - r2).max() > 1e-4
  # Same image, different masks: dropout is drawn per example.
  same = np.repeat(IMAGES[:1], 4, axis=0)
  per_example = apply(model, BASE_VARS["params"], pr, same, train=True,
                      rngs={"dropout": jax.random.PRNGKey(3)})
  assert np.abs(per_example[0] - per_example[1]).max() > 1e-5


def test_uniform_init_bound_of_the_paper():
  model, pr = build(deep=True, length=50)
  t = tokens_of(pr)
  v = math.sqrt(6.0 / (3 * 4 * 4 + 64))  # sqrt(6 / (3 * patch * patch + d))
  assert np.abs(t).max() <= v and np.abs(t).max() > 0.98 * v
  assert abs(t.mean()) < 0.1 * v and abs(t.std() - v / math.sqrt(3)) < 0.02
  # ViT-B/16: v = sqrt(6 / 1536) = 0.0625, as quoted for the official code.
  vpt = prompts.VPT(length=1, layers=(0,), width=768, patch_size=(16, 16), image_size=(224, 224),
                    in_channels=3, num_prefix=1, num_patches=196)
  assert vpt.init_bound == pytest.approx(0.0625)


def test_init_from_array(tmp_path):
  model, pr = build(deep=True)
  arr = np.random.default_rng(0).normal(size=(P, 64)).astype(np.float32)
  path = tmp_path / "cls_embeddings.npy"
  np.save(path, arr)
  loaded = prompts.load_init(pr, config(init=str(path)))
  np.testing.assert_array_equal(tokens_of(loaded), np.broadcast_to(arr, (2, P, 64)))
  per_layer = np.stack([arr, -arr])
  np.testing.assert_array_equal(tokens_of(prompts.init_from_array(pr, per_layer)), per_layer)
  np.save(path, arr[:2])
  with pytest.raises(ValueError, match=r"cls_embeddings.npy: prompt init array has shape \(2, 64\)"):
    prompts.load_init(pr, config(init=str(path)))
  with pytest.raises(ValueError, match=r"prompt.init='/no/file.npy'"):
    prompts.load_init(pr, config(init="/no/file.npy"))


# ----------------------------------------------------------------------------------------------
# Configuration errors name the option.


@pytest.mark.parametrize("kw,match", [
    (dict(length=-1), r"prompt.length=-1"),
    (dict(location="append"), r"prompt.location='append'"),
    (dict(pool="mean"), r"prompt.pool='mean'"),
    (dict(location="pad", deep=True), r"prompt.location='pad'.*prompt.deep=False"),
    (dict(shared=True, deep=False), r"prompt.shared=True"),
    (dict(depth=3, deep=True), r"prompt.depth=3 must be in 0..2"),
    (dict(reverse=True, deep=True), r"prompt.reverse=True needs prompt.depth"),
    (dict(depth=1, deep=False), r"prompt.depth / prompt.reverse apply to VPT-deep"),
    (dict(pool="prompt", location="add"), r"prompt.pool='prompt' reads prompt outputs"),
    (dict(pool="all", depth=1, expand=False), r"prompt.expand=False drops"),
    (dict(dropout=1.0), r"prompt.dropout=1.0"),
    (dict(project=8, location="prepend-pixel", deep=False), r"prompt.project applies"),
    (dict(location="pad", deep=False, length=16), r"prompt.length=16: a pad this wide"),
])
def test_bad_options_are_named(kw, match):
  with pytest.raises(ValueError, match=match):
    prompts.attach(BASE, config(**kw))


def test_unknown_option_and_cls_pool_without_class_token():
  cfg = config()
  cfg.unlocked = True
  with pytest.raises(ValueError, match=r"unknown config option\(s\) prompt.unlocked"):
    prompts.attach(BASE, cfg)
  base, _ = vpt_jax.load_pretrained(data_path("bigvision_gap.npz"))
  with pytest.raises(ValueError, match=r"prompt.pool='cls' needs a backbone with a class token"):
    prompts.attach(base, config(pool="cls"))


# ----------------------------------------------------------------------------------------------
# Parameter counts on ViT-B/16 (abstract shapes: no memory, no compute).


def _vit_b16(num_classes=100):
  return Architecture(patch_size=(16, 16), in_channels=3, width=768, depth=12, num_heads=12,
                      mlp_dim=3072, grid=(14, 14), pool_type="token", class_token=True,
                      posemb_cls_row=True, representation_size=None, num_classes=num_classes).model()


def _abstract_variables(model):
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  return jax.eval_shape(lambda i: model.init(jax.random.PRNGKey(0), i), x)


def test_vit_b16_prompt_counts_of_the_paper():
  """Paper, Sec. 3.2: 50 shallow prompts add 50 x 768, 50 deep prompts 12 x 50 x 768."""
  base = _vit_b16()
  for deep, n in [(False, 50 * 768), (True, 12 * 50 * 768)]:
    model = prompts.attach(base, config(length=50, deep=deep))
    variables = _abstract_variables(model)
    assert rules.count(variables["prompts"]) == n
    # Backbone without head: the well-known 85,798,656 of ViT-B/16 (86,567,656 with 1000 classes).
    assert rules.count({k: v for k, v in variables["params"].items() if k != "head"}) == 85798656
    mask = rules.label(variables, rules.protocol_patterns("vpt"))
    report = rules.param_report(variables, mask, n_tasks=24)
    t = n + 768 * 100 + 100
    assert report["trainable"] == t
    assert report["total_multiple"] == pytest.approx((85798656 + 24 * t) / 85798656)
