"""E2VPT key-value prompts: softmax(Q [K; P_K]^T / sqrt(d)) [V; P_V] in every layer, with VPT-deep."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import numpy_vit
import vpt_jax
from conftest import ATOL, RTOL, data_path, jit_apply, load_io
from vpt_jax import prompts
from vpt_jax.tuning import rules
from vpt_jax.weights.npz import Architecture

IMAGES = load_io("vitjax_token.io.npz")["images"]
BASE, BASE_VARS = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))  # 2 layers, 4 heads
REF = dict(patch=4, depth=2, pool="token", cls_row=True)


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def build(**kw):
  cfg = prompts.default_config()
  cfg.update(dict(length=3, kv_length=5) | kw)
  model = prompts.attach(BASE, cfg)
  return model, prompts.init_prompts(model, jax.random.PRNGKey(0))


def apply(model, pr, **kw):
  return np.asarray(jit_apply(model, {"params": BASE_VARS["params"], "prompts": pr}, IMAGES,
                              **kw))


def deep_insert(tokens, p=3):
  put = lambda t, replace: (lambda x: np.concatenate(
      [x[:, :1], np.broadcast_to(np.asarray(t, np.float64), (x.shape[0],) + t.shape),
       x[:, 1 + replace:]], 1))
  return {0: put(tokens[0], 0), 1: put(tokens[1], p)}


def test_zero_kv_tokens_is_vpt_deep_exactly():
  e2, pr = build(kv_length=0)
  cfg = prompts.default_config()
  cfg.length = 3
  vpt = prompts.attach(BASE, cfg)
  np.testing.assert_array_equal(apply(e2, pr), apply(vpt, pr))
  assert set(pr["hooks"]) == {"tokens"}


def test_shared_kv_prompts_match_numpy_attention():
  model, pr = build()
  kv = np.asarray(pr["hooks"]["kv"])
  assert kv.shape == (2, 4, 5, 16)  # (layers, heads, n, head_dim), the official layout
  extra = {i: (kv[i].transpose(1, 0, 2), kv[i].transpose(1, 0, 2)) for i in range(2)}
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                               insert=deep_insert(pr["hooks"]["tokens"]), extra_kv=extra)
  got = apply(model, pr)
  np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
  without = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                              insert=deep_insert(pr["hooks"]["tokens"]))
  assert np.abs(expected - without).max() > 1e-3  # the key-value prompts matter


def test_separate_keys_and_values_and_first_layer_only():
  model, pr = build(kv_shared=False, kv_deep=False)
  k, v = (np.asarray(pr["hooks"][n]) for n in ("kv", "kv_values"))
  assert k.shape == v.shape == (1, 4, 5, 16) and not np.array_equal(k, v)
  extra = {0: (k[0].transpose(1, 0, 2), v[0].transpose(1, 0, 2))}
  expected = numpy_vit.forward(flat(BASE_VARS["params"]), IMAGES, **REF,
                               insert=deep_insert(pr["hooks"]["tokens"]), extra_kv=extra)
  np.testing.assert_allclose(apply(model, pr), expected, atol=ATOL, rtol=RTOL)


def test_kaiming_uniform_init():
  model, pr = build(kv_length=20)
  kv = np.asarray(pr["hooks"]["kv"])
  bound = math.sqrt(6.0 / (20 * 16))  # fan-in n * head_dim
  assert np.abs(kv).max() <= bound and np.abs(kv).max() > 0.95 * bound
  # ViT-B/16 with 5 tokens: sqrt(6 / (5 * 64)) = 0.137, as in the official code.
  vpt = prompts.VPT(length=1, layers=(0,), width=768, patch_size=(16, 16), image_size=(224, 224),
                    in_channels=3, num_prefix=1, num_patches=196, kv_length=5, num_heads=12)
  assert vpt.kv_bound == pytest.approx(0.1369, abs=1e-4)


def test_works_on_a_gap_backbone_and_in_bfloat16():
  base, variables = vpt_jax.load_pretrained(data_path("bigvision_gap.npz"), dtype=jnp.bfloat16)
  cfg = prompts.default_config()
  cfg.update(dict(length=3, kv_length=5))
  model = prompts.attach(base, cfg)
  pr = prompts.init_prompts(model, jax.random.PRNGKey(0))
  out = np.asarray(jit_apply(model, {**variables, "prompts": pr}, IMAGES))
  f32 = np.asarray(jit_apply(model.clone(dtype=jnp.float32), {**variables, "prompts": pr}, IMAGES))
  assert out.dtype == np.float32 and np.isfinite(out).all()
  np.testing.assert_allclose(out, f32, atol=0.05 * np.abs(f32).max())


def test_vit_b16_counts_and_config_errors():
  """Visual 12 x 10 x 768 plus key-value 12 x 5 x 768 (E2VPT's VTAB setting, before pruning)."""
  base = Architecture(patch_size=(16, 16), in_channels=3, width=768, depth=12, num_heads=12,
                      mlp_dim=3072, grid=(14, 14), pool_type="token", class_token=True,
                      posemb_cls_row=True, representation_size=None, num_classes=100).model()
  cfg = prompts.default_config()
  cfg.update(dict(length=10, kv_length=5))
  model = prompts.attach(base, cfg)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert rules.count(shapes["prompts"]) == 92160 + 46080
  cfg.kv_length = -1
  with pytest.raises(ValueError, match=r"prompt.kv_length=-1"):
    prompts.attach(base, cfg)


def test_trainer_runs_e2vpt_prompts(tmp_path):
  from configs import demo
  from vpt_jax.tuning import loop
  from conftest import SMALL_DIGITS
  c = demo.get_config("vpt-deep,model.checkpoint=tiny-random,optim.epochs=1,optim.warmup_epochs=0,"
                      f"prompt.length=2,prompt.kv_length=3,log_every_steps=12,{SMALL_DIGITS}")
  results = loop.train_and_evaluate(c, str(tmp_path))
  # visual 2 layers x 2 x 64, key-value 2 layers x 4 heads x 3 x 16, head 64 x 10 + 10
  assert results["trainable_params"] == 2 * 2 * 64 + 2 * 4 * 3 * 16 + 650
  kv_only = demo.get_config("vpt-deep,model.checkpoint=tiny-random,optim.epochs=1,"
                            "optim.warmup_epochs=0,prompt.length=0,prompt.kv_length=3,"
                            + SMALL_DIGITS)
  assert loop.train_and_evaluate(kv_only, str(tmp_path / "kv"))["trainable_params"] == 384 + 650
