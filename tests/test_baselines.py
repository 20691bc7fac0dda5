"""The paper's baselines as configs of the one trainer: full, linear, partial-k, MLP-k, bias,
adapter, side-tuning.

Each protocol is built from the demo config (the shipped `demo-vit` backbone), trained a few SGD
steps on real digits, and checked leaf by leaf: exactly its trainable leaves move, every other leaf
is bit-identical. Counts are checked against formulas written from the architecture's sizes; the
extra modules against independent float64 numpy on the small test fixture backbone.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_vit
import vpt_jax
from configs import demo
from conftest import data_path, jit_apply, jit_init, load_io
from vpt_jax.models import heads
from vpt_jax.tuning import build, optim, rules, steps

# demo-vit: 32x32 images, patch 4 (64 patches), width 64, 4 layers, MLP 192, class token; 10 classes.
D, DEPTH, MLP, P, N, K = 64, 4, 192, 4, 64, 10
BLOCK = 2 * D + 4 * (D * D + D) + 2 * D + (D * MLP + MLP) + (MLP * D + D)
BLOCK_BIASES = D + 4 * D + D + MLP + D          # LN_0, q/k/v/out, LN_1, Dense_0, Dense_1
BACKBONE = (P * P * 3 * D + D) + D + (1 + N) * D + DEPTH * BLOCK + 2 * D
HEAD = D * K + K
BOTTLENECK = D // 8
SIDE = (9 * 3 * 16 + 16) + (9 * 16 * 32 + 32) + (9 * 32 * 64 + 64) + (64 * D + D) + 1
EXPECTED_TRAINABLE = {
    "full": BACKBONE + HEAD,
    "linear": HEAD,
    "partial-1": BLOCK + 2 * D + HEAD,
    "mlp-3": 2 * (D * D + D + 2 * D) + HEAD,
    "bias": DEPTH * BLOCK_BIASES + D + D + HEAD,  # blocks, patch embedding, encoder_norm, head
    "adapter": DEPTH * (D * BOTTLENECK + BOTTLENECK + BOTTLENECK * D + D) + HEAD,
    "side": SIDE + HEAD,
}
PROTOCOLS = sorted(EXPECTED_TRAINABLE)
LR = {"full": 3e-3}
STEPS = 6


def demo_config(protocol):
  c = demo.get_config("linear")
  c.protocol = protocol
  c.model.num_classes = K
  return c


@pytest.fixture(scope="module")
def digits():
  """Two batches of 32 preprocessed training digits, as the trainer's pipeline makes them."""
  from vpt_jax.data import pipeline, sources
  cfg = demo_config("linear").data
  split = sources.load_splits(cfg, ["train800"])["train800"]
  pipe = pipeline.Pipeline(split, pipeline.make_preprocess(cfg, 32, train=True), batch_size=32,
                           seed=0)
  batches = pipe.train_batches(0)
  return [next(batches) for _ in range(2)]


@pytest.fixture(scope="module")
def runs(digits):
  """protocol -> (built, variables after STEPS SGD steps, losses on batch 0 before/after)."""
  out = {}
  for protocol in PROTOCOLS:
    built = build.build(demo_config(protocol))
    cfg = optim.default_optim_config()
    cfg.update(dict(name="adamw", lr=LR.get(protocol, 1e-2), wd=0.0, warmup_epochs=0, epochs=STEPS))
    tx, _ = optim.make_optimizer(cfg, steps_per_epoch=1)
    trainable, frozen = rules.split(built.variables, built.mask)
    state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(0))
    step = jax.jit(steps.make_train_step(built.model, tx))
    losses = []
    for i in range(STEPS):
      state, metrics = step(state, frozen, digits[i % 2])
      losses.append(float(metrics["loss"]))
    state, metrics = step(state, frozen, digits[0])  # the loss after STEPS steps on batch 0
    after = rules.merge(state.trainable, frozen)
    out[protocol] = (built, after, losses[0], float(metrics["loss"]))
  return out


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_exactly_the_protocols_leaves_change(runs, protocol):
  built, after, _, _ = runs[protocol]
  before = built.variables
  paths = rules.leaf_paths(before)
  assert rules.leaf_paths(after) == paths
  trainable = {p for p, m in zip(paths, jax.tree.leaves(built.mask)) if m}
  changed = {p for p, a, b in zip(paths, jax.tree.leaves(after), jax.tree.leaves(before))
             if not np.array_equal(np.asarray(a), np.asarray(b))}
  # A key bias adds q.b to every logit of a query: softmax ignores it, so its gradient is zero.
  gradient_free = {p for p in trainable if p.endswith("/key/bias")}
  assert changed <= trainable, sorted(changed - trainable)
  assert trainable - changed <= gradient_free, sorted(trainable - changed - gradient_free)
  expected_prefix = {
      "full": ("params/", "modules/"), "linear": ("params/head/",),
      "partial-1": ("params/Transformer/encoderblock_3/", "params/Transformer/encoder_norm/",
                    "params/head/"),
      "mlp-3": ("modules/hooks/mlp/", "params/head/"), "bias": ("params/",),
      "adapter": ("modules/hooks/adapter_", "params/head/"),
      "side": ("modules/hooks/side/", "params/head/")}[protocol]
  assert all(p.startswith(expected_prefix) for p in trainable)
  if protocol == "bias":
    assert all(p.endswith("/bias") or p.startswith("params/head/") for p in trainable)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_protocol_trains_on_the_demo_digits(runs, protocol):
  _, _, first, last = runs[protocol]
  assert math.isfinite(last) and last < first - 0.15, (first, last)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_parameter_counts_match_the_architecture(runs, protocol):
  built = runs[protocol][0]
  r = rules.param_report(built.variables, built.mask, n_tasks=24)
  t = EXPECTED_TRAINABLE[protocol]
  assert (r["backbone"], r["trainable"]) == (BACKBONE, t)  # modules are never backbone
  shared = 0 if protocol == "full" else BACKBONE
  assert r["total_multiple"] == pytest.approx((shared + 24 * t) / BACKBONE)
  if protocol in ("mlp-3", "adapter", "side"):
    assert rules.count(built.variables[heads.COLLECTION]) == t - HEAD


def test_adapter_starts_as_the_backbone_and_its_down_projection_learns(runs, digits):
  """up = 0 makes the start exact; the down-projection gets a gradient once up has moved.

  The official init (down = 0 too) would leave the down-projection's gradient zero forever.
  """
  built = runs["adapter"][0]
  base, v = vpt_jax.load_pretrained("demo-vit", num_classes=K)
  v = {**v, "params": {**v["params"], "head": built.variables["params"]["head"]}}  # same head
  images = digits[0]["image"]
  np.testing.assert_array_equal(jit_apply(built.model, built.variables, images),
                                jit_apply(base, v, images))

  loss_fn = jax.jit(jax.grad(steps.make_loss_fn(built.model), has_aux=True))
  mods = built.variables[heads.COLLECTION]["hooks"]
  head = {"kernel": jnp.asarray(np.random.default_rng(0).normal(0, 0.1, (D, K)), jnp.float32),
          "bias": jnp.zeros((K,))}
  params = {**built.variables["params"], "head": head}

  def down_grad(modules):
    variables = {"params": params, heads.COLLECTION: {"hooks": modules}}
    grads, _ = loss_fn(variables, {}, images, digits[0]["label"], jax.random.PRNGKey(0))
    g = grads[heads.COLLECTION]["hooks"]
    return g, np.abs(np.asarray(g["adapter_0"]["down"]["kernel"])).max()

  g0, down0 = down_grad(mods)
  assert down0 == 0.0  # up = 0 blocks it at the very start...
  assert np.abs(np.asarray(g0["adapter_0"]["up"]["kernel"])).max() > 0
  stepped = jax.tree.map(lambda p, g: p - 0.1 * g, mods, g0)
  assert down_grad(stepped)[1] > 1e-6  # ...but not after one step
  official = jax.tree.map(jnp.zeros_like, mods)
  g1, down1 = down_grad(jax.tree.map(lambda p, g: p - 0.1 * g, official, down_grad(official)[0]))
  assert down1 == 0.0 and np.abs(np.asarray(g1["adapter_0"]["up"]["kernel"])).max() == 0.0


# ------------------------------------------------------------------------------------------------
# The modules against independent float64 numpy, on the 2-layer test fixture backbone.

FIXTURE_IMAGES = load_io("vitjax_token.io.npz")["images"]


def _randomised(model, scale=0.3):
  """The model's variables with every module leaf random (so zero inits hide nothing)."""
  v = jit_init(model, jax.random.PRNGKey(0), FIXTURE_IMAGES[:1])
  _, params = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))
  leaves, tree = jax.tree.flatten(v[heads.COLLECTION])
  rng = np.random.default_rng(1)
  leaves = [jnp.asarray(rng.normal(0, scale, np.shape(x)), jnp.float32) for x in leaves]
  return {**params, heads.COLLECTION: jax.tree.unflatten(tree, leaves)}


def _flat(tree):
  return {p: np.asarray(x, np.float64) for p, x in zip(rules.leaf_paths(tree),
                                                          jax.tree.leaves(tree))}


def _fixture(**spec):
  base, v = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))
  model = heads.attach(base, heads.default_config(), **spec)
  variables = _randomised(model)
  p = _flat(variables["params"])
  m = {k[len("hooks/"):]: x for k, x in _flat(variables[heads.COLLECTION]).items()}
  logits = np.asarray(jit_apply(model, variables, FIXTURE_IMAGES), np.float64)
  return p, m, logits


def _reference(p, **kw):
  return numpy_vit.forward(p, FIXTURE_IMAGES, patch=4, depth=2, pool="token", cls_row=True, **kw)


def test_mlp_head_matches_numpy():
  p, m, logits = _fixture(mlp_layers=2)

  def mlp(f):
    for i in range(2):
      h = np.maximum(f @ m[f"mlp/dense_{i}/kernel"] + m[f"mlp/dense_{i}/bias"], 0.0)
      f = numpy_vit.layer_norm(h, m[f"mlp/norm_{i}/scale"], m[f"mlp/norm_{i}/bias"])
    return f
  np.testing.assert_allclose(logits, _reference(p, features_fn=mlp), atol=2e-4, rtol=1e-4)


def test_adapters_match_numpy():
  p, m, logits = _fixture(adapter=True)

  def adapter(i):
    a = lambda n: m[f"adapter_{i}/{n}"]
    return lambda y: y + numpy_vit.gelu_tanh(y @ a("down/kernel") + a("down/bias")) @ a(
        "up/kernel") + a("up/bias")
  ref = _reference(p, mlp_fn={0: adapter(0), 1: adapter(1)})
  np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=1e-4)
  assert np.abs(ref - _reference(p)).max() > 1e-2  # the adapters matter


def _conv_same_stride2(x, kernel, bias):
  """3x3 stride-2 'SAME' convolution: XLA pads 0 before and 1 after an even size."""
  b, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  out = np.zeros((b, h // 2, w // 2, kernel.shape[-1]))
  for i in range(h // 2):
    for j in range(w // 2):
      patch = xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
      out[:, i, j] = np.einsum("bxyc,xyco->bo", patch, kernel)
  return out + bias


def test_side_network_matches_numpy():
  p, m, logits = _fixture(side=True)

  def side(f):
    s = np.asarray(FIXTURE_IMAGES, np.float64)
    for i in range(3):
      s = np.maximum(_conv_same_stride2(s, m[f"side/conv_{i}/kernel"], m[f"side/conv_{i}/bias"]),
                     0.0)
    s = s.mean(axis=(1, 2)) @ m["side/proj/kernel"] + m["side/proj/bias"]
    a = 1.0 / (1.0 + np.exp(-m["side/alpha"]))
    return a * f + (1.0 - a) * s
  np.testing.assert_allclose(logits, _reference(p, features_fn=side), atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Configuration.


@pytest.mark.parametrize("override,match", [
    ("modules.adapter_reduction=0", r"modules.adapter_reduction=0 must be >= 1"),
    ("modules.mlp_norm=batchnorm", r"modules.mlp_norm='batchnorm'"),
    ("modules.mlp_dropout=1.0", r"modules.mlp_dropout=1.0"),
    ("modules.mlp_hidden=-1", r"modules.mlp_hidden=-1"),
    ("protocol=mlp-1", r"mlp-1.*k >= 2"),
    ("cache_features=sometimes", r"cache_features='sometimes'"),
])
def test_bad_options_are_named(override, match):
  c = demo.get_config(f"linear,{override}")
  with pytest.raises(ValueError, match=match):
    build.check_config(c)


def test_unknown_module_options_and_protocols_are_named():
  cfg = heads.default_config()
  cfg.depth = 2
  with pytest.raises(ValueError, match=r"unknown config option\(s\) modules.depth"):
    heads.check_config(cfg)
  with pytest.raises(ValueError, match=r"unknown protocol 'adapters'.*adapter or side"):
    rules.protocol_patterns("adapters")


def test_mlp_head_of_another_width_gets_a_fresh_head():
  c = demo_config("mlp-2")
  c.modules.mlp_hidden = 32
  c.modules.mlp_norm = "none"
  built = build.build(c)
  assert built.variables["params"]["head"]["kernel"].shape == (32, K)
  np.testing.assert_allclose(built.variables["params"]["head"]["bias"], -np.log(99.0), rtol=1e-6)
  c.model.head_init = "zeros"
  assert not np.any(build.build(c).variables["params"]["head"]["kernel"])
  r = rules.param_report(built.variables, built.mask)
  assert r["trainable"] == (D * 32 + 32) + (32 * K + K)
  assert "module_hooks" in built.fingerprint()


def test_prompts_and_modules_compose_with_their_own_paths():
  """VPT + an MLP head: prompts keep `prompts/hooks/tokens` and their initial values."""
  c = demo_config("mlp-2")
  c.prompt.length, c.prompt.deep = 3, True
  c.trainable = (r"prompts/.*", r"modules/.*", r"params/head/.*")
  built = build.build(c)
  alone = demo_config("vpt")
  alone.prompt.length, alone.prompt.deep = 3, True
  vpt = build.build(alone)
  np.testing.assert_array_equal(built.variables["prompts"]["hooks"]["tokens"],
                                vpt.variables["prompts"]["hooks"]["tokens"])
  assert isinstance(built.model.hooks, heads.ComposedHooks)
  paths = rules.leaf_paths(rules.split(built.variables, built.mask)[0])
  assert "prompts/hooks/tokens" in paths and "modules/hooks/mlp/dense_0/kernel" in paths
  # With the MLP head at its start (head zero), the composed model equals VPT with that MLP.
  images = jnp.zeros((2, 32, 32, 3))
  f_composed = jit_apply(built.model, built.variables, images, mutable=["intermediates"])[1]
  f_vpt = jit_apply(vpt.model, vpt.variables, images, mutable=["intermediates"])[1]
  np.testing.assert_allclose(f_composed["intermediates"]["pooled"][0],
                             f_vpt["intermediates"]["pooled"][0], atol=1e-6)
