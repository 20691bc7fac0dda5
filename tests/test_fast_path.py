"""The fast path (compute only what the output needs) equals the straightforward one, exactly.

For every prompt variant: same logits and same gradients of prompts and head (<= 1e-5, float32),
on the fixture model and on a random 3-layer model (first-2 / last-2 leave a layer out); and it
really computes less (XLA FLOPs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vpt_jax
from conftest import data_path, load_io
from vpt_jax import prompts
from vpt_jax.models.vit import VisionTransformer
from vpt_jax.tasks.classification import cross_entropy
from vpt_jax.tuning import rules

IMAGES = load_io("vitjax_token.io.npz")["images"]
LABELS = jnp.array([0, 3, 1, 4])


def _perturbed(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + rng.normal(0, 0.1, p.shape).astype(np.float32), params)


def fixture_model():
  model, v = vpt_jax.load_pretrained(data_path("vitjax_token.npz"), num_classes=5)
  return model, _perturbed(v["params"], 0)


def random_model(pool="token", class_token=True):
  model = VisionTransformer(image_size=(32, 32), patch_size=(4, 4), width=64, depth=3,
                            num_heads=4, mlp_dim=128, num_classes=5, pool_type=pool,
                            class_token=class_token, representation_size=None)
  params = model.init(jax.random.PRNGKey(0), IMAGES[:1])["params"]
  return model, _perturbed(params, 1)


VARIANTS = {
    "deep": dict(length=3),
    "shallow": dict(length=3, deep=False),
    "first-2": dict(length=3, depth=2),
    "last-2": dict(length=3, depth=2, reverse=True),
    "first-2-no-expand": dict(length=3, depth=2, expand=False),
    "shared": dict(length=3, shared=True),
    "pool-image": dict(length=3, pool="image"),
    "pool-prompt": dict(length=3, pool="prompt"),
    "pool-all": dict(length=3, pool="all"),
    "pool-cls": dict(length=3, pool="cls"),
    "e2vpt": dict(length=3, kv_length=2),
    "e2vpt-separate-kv": dict(length=3, kv_length=2, kv_shared=False),
    "kv-only": dict(length=0, kv_length=2),
    "project": dict(length=3, project=16),
    "masks": dict(length=4, masks=True),
    "dropout": dict(length=3, dropout=0.5),
}
PRUNED = {"token_mask": jnp.array([1.0, 0.0, 1.0, 1.0]),
          "segment_mask": jnp.ones((4, 16)).at[0, 3].set(0.0).at[2, :5].set(0.0)}


def _pair(model, kw):
  cfg = prompts.default_config()
  cfg.update(kw)
  fast = prompts.attach(model.clone(fast_path=True), cfg)
  slow = prompts.attach(model.clone(fast_path=False), cfg)
  return fast, slow, cfg


def _check(model, params, kw, expect_fewer_flops):
  fast, slow, cfg = _pair(model, kw)
  pr = prompts.init_prompts(slow, jax.random.PRNGKey(2))
  variables = {"params": params, "prompts": pr}
  if cfg.masks:
    variables["prompt_masks"] = {"hooks": PRUNED}
  mask = rules.label(variables, [r"prompts/.*", r"params/head/.*"])
  trainable, frozen = rules.split(variables, mask)
  train = bool(cfg.dropout)

  def loss(m, t):
    logits = m.apply(rules.merge(t, frozen), IMAGES, train=train,
                     rngs={"dropout": jax.random.PRNGKey(5)})
    return cross_entropy(logits, LABELS).mean(), logits

  outs = {}
  for name, m in (("fast", fast), ("slow", slow)):
    # One compile per path: the compiled function gives the values and XLA's FLOP count.
    fn = jax.jit(jax.value_and_grad(lambda t, m=m: loss(m, t), has_aux=True))
    compiled = fn.lower(trainable).compile()
    (_, logits), g = compiled(trainable)
    flops = compiled.cost_analysis()
    flops = (flops[0] if isinstance(flops, list) else flops).get("flops")
    outs[name] = (np.asarray(logits), g, flops)
  (lf, gf, ff), (ls, gs, fs) = outs["fast"], outs["slow"]
  np.testing.assert_allclose(lf, ls, atol=1e-5, rtol=1e-5)
  for a, b, path in zip(jax.tree.leaves(gf), jax.tree.leaves(gs), rules.leaf_paths(gs)):
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5 * scale, path
  if expect_fewer_flops:
    assert ff < 0.97 * fs, (ff, fs)
  return fast


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_fast_path_equals_straightforward_on_random_model(name):
  model, params = random_model()
  fast = _check(model, params, VARIANTS[name], expect_fewer_flops=True)
  if name in ("deep", "e2vpt", "last-2", "shared", "masks", "pool-image", "project", "dropout"):
    assert fast.hooks.kv_only_layers  # prompts really went the keys/values-only way
  if name == "shallow":
    assert not fast.hooks.kv_only_layers  # shallow prompts flow through: never key-value only


@pytest.mark.parametrize("name", ["deep", "shallow", "e2vpt", "masks", "pool-all"])
def test_fast_path_equals_straightforward_on_fixture_model(name):
  model, params = fixture_model()
  _check(model, params, VARIANTS[name], expect_fewer_flops=name != "pool-all")


@pytest.mark.parametrize("pool,class_token", [("token", True), ("gap", True), ("map", False)])
def test_plain_vit_fast_path(pool, class_token):
  """No prompts: linear probing and the plain ViT (class-token-only last layer when pooled so)."""
  model, params = random_model(pool, class_token)
  fast, slow = model.clone(fast_path=True), model.clone(fast_path=False)
  v = {"params": params}
  cf, cs = (jax.jit(m.apply).lower(v, IMAGES).compile() for m in (fast, slow))
  np.testing.assert_allclose(cf(v, IMAGES), cs(v, IMAGES), atol=1e-5, rtol=1e-5)
  get = lambda c: (c[0] if isinstance(c, list) else c)["flops"]
  if pool == "token":
    assert get(cf.cost_analysis()) < 0.9 * get(cs.cost_analysis())
  else:
    assert get(cf.cost_analysis()) == get(cs.cost_analysis())


def test_kv_only_layer_rule():
  cfg = prompts.default_config()
  cases = [
      (dict(), (0, 1, 2, 3), (0, 1, 2, 3)),
      (dict(pool="all"), (0, 1, 2, 3), (0, 1, 2)),
      (dict(), (0, 1), (0,)),                      # first-2: layer 1's prompts flow on
      (dict(expand=False), (0, 1), (0, 1)),        # ... unless dropped after it
      (dict(), (2, 3), (2, 3)),                    # last-2
      (dict(deep=False), (0,), ()),                # shallow
      (dict(location="add"), (0, 1, 2, 3), ()),
  ]
  for kw, layers, want in cases:
    c = cfg.copy_and_resolve_references()
    c.update(kw)
    assert prompts.kv_only_layers(layers, 4, c) == want, (kw, layers)
