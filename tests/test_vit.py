"""The ViT module on its own: every pooling type against numpy, and the two encoder hook points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import numpy_vit
import vpt_jax
from conftest import ATOL, RTOL, data_path, jit_apply, jit_init, load_io
from vpt_jax.models.hooks import EncoderHooks, LayerInput
from vpt_jax.models.vit import VisionTransformer

IMAGES = load_io("vitjax_token.io.npz")["images"]


def flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def close(a, b):
  np.testing.assert_allclose(a, b, atol=ATOL, rtol=RTOL)


def _perturbed(params, seed):
  """Random init has zeros (head, cls) and ones (LN scales) that hide mistakes; add noise."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + rng.normal(0, 0.1, p.shape).astype(np.float32), params)


@pytest.mark.parametrize("pool,class_token,cls_row,rep", [
    ("token", True, False, None),
    ("token", True, True, 32),
    ("gap", False, False, None),
    ("gap", True, False, None),
    ("map", False, False, 48),
])
def test_random_model_matches_numpy_reference(pool, class_token, cls_row, rep):
  model = VisionTransformer(image_size=(32, 32), patch_size=(4, 4), width=64, depth=2,
                            num_heads=4, mlp_dim=128, num_classes=10, pool_type=pool,
                            class_token=class_token, posemb_cls_row=cls_row,
                            representation_size=rep)
  params = _perturbed(jit_init(model, jax.random.PRNGKey(0), IMAGES[:1])["params"], seed=1)
  expected = numpy_vit.forward(flat(params), IMAGES, patch=4, depth=2, pool=pool, cls_row=cls_row)
  close(jax.jit(model.apply)({"params": params}, IMAGES), expected)


def test_no_head_returns_features():
  model = VisionTransformer(image_size=(32, 32), patch_size=(4, 4), width=64, depth=1,
                            num_heads=4, mlp_dim=128, num_classes=None)
  variables = jit_init(model, jax.random.PRNGKey(0), IMAGES[:1])
  assert "head" not in variables["params"]
  assert jit_apply(model, variables, IMAGES).shape == (4, 64)


@pytest.mark.parametrize("kw,match", [
    (dict(pool_type="cls"), "unknown pool_type 'cls'"),
    (dict(pool_type="token", class_token=False), "pool_type='token' needs class_token"),
    (dict(pool_type="gap", class_token=False, posemb_cls_row=True), "posemb_cls_row=True needs"),
    (dict(image_size=(30, 30)), r"image_size \(30, 30\) is not a multiple"),
])
def test_invalid_configuration(kw, match):
  cfg = dict(image_size=(32, 32), patch_size=(4, 4), width=64, depth=1, num_heads=4, mlp_dim=128)
  model = VisionTransformer(**(cfg | kw))
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, *model.image_size, 3)))


# --------------------------------------------------------------------------------------------
# Hooks: what the prompt issues plug into, tested with a hand-made provider.


class ToyPrompts(EncoderHooks):
  """Inserts n tokens before layer 0, replaces them before layer 1 (VPT-deep style), and adds
  n_kv extra keys/values in every layer; all in the 'prompts' collection."""

  n: int = 3
  n_kv: int = 2
  width: int = 64
  heads: int = 4
  depth: int = 2

  def setup(self):
    init = lambda shape: lambda: jax.random.normal(self.make_rng("params"), shape)
    self.tokens = self.variable("prompts", "tokens", init((self.depth, self.n, self.width)))
    hd = self.width // self.heads
    self.keys = self.variable("prompts", "keys", init((self.depth, self.n_kv, self.heads, hd)))
    self.values = self.variable("prompts", "values", init((self.depth, self.n_kv, self.heads, hd)))

  def layer(self, layer, x, *, num_prompts, train):
    p = jnp.broadcast_to(self.tokens.value[layer], (x.shape[0], self.n, self.width))
    tokens = jnp.concatenate([x[:, :1], p, x[:, 1 + num_prompts:]], axis=1)
    return LayerInput(tokens, self.n, extra_kv=(self.keys.value[layer], self.values.value[layer]))


def _hooked(hooks):
  base, variables = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))
  return base.clone(hooks=hooks), variables


def test_hooks_insert_tokens_and_extra_kv_match_numpy():
  model, variables = _hooked(ToyPrompts())
  prompts = jit_init(model, jax.random.PRNGKey(3), IMAGES[:1])["prompts"]
  assert set(variables) == {"params"} and set(prompts) == {"hooks"}
  logits, state = jax.jit(lambda v, x: model.clone(fast_path=False).apply(
      v, x, mutable=["intermediates"]))(variables | {"prompts": prompts}, IMAGES)
  assert state["intermediates"]["encoded"][0].shape == (4, 1 + 3 + 64, 64)
  # The fast path (class-token row only in the last layer) computes the same logits.
  close(jit_apply(model, variables | {"prompts": prompts}, IMAGES), logits)

  tok = np.asarray(prompts["hooks"]["tokens"], np.float64)
  keys = np.asarray(prompts["hooks"]["keys"])
  values = np.asarray(prompts["hooks"]["values"])
  insert = {
      0: lambda x: np.concatenate([x[:, :1], np.broadcast_to(tok[0], (4, 3, 64)), x[:, 1:]], 1),
      1: lambda x: np.concatenate([x[:, :1], np.broadcast_to(tok[1], (4, 3, 64)), x[:, 4:]], 1),
  }
  kv = {i: (keys[i], values[i]) for i in range(2)}
  params = flat(variables["params"])
  expected = numpy_vit.forward(params, IMAGES, patch=4, depth=2, pool="token", cls_row=True,
                               insert=insert, extra_kv=kv)
  close(logits, expected)
  # The prompts really matter (the comparison above is not trivially satisfied).
  plain = numpy_vit.forward(params, IMAGES, patch=4, depth=2, pool="token", cls_row=True)
  assert np.abs(expected - plain).max() > 1e-3


def test_identity_hooks_change_nothing():
  model, variables = _hooked(EncoderHooks())
  base, _ = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))
  np.testing.assert_array_equal(model.apply(variables, IMAGES), base.apply(variables, IMAGES))


def test_gradient_reaches_prompts_but_not_through_params():
  """Prompts are a separate collection: differentiate them alone, with params as constants."""
  model, variables = _hooked(ToyPrompts())
  prompts = jit_init(model, jax.random.PRNGKey(3), IMAGES[:1])["prompts"]

  @jax.jit
  def loss(p):
    return jnp.sum(model.apply({"params": variables["params"], "prompts": p}, IMAGES) ** 2)

  grads = jax.jit(jax.grad(loss))(prompts)
  assert jax.tree.structure(grads) == jax.tree.structure(prompts)
  g = grads["hooks"]["tokens"]
  assert np.abs(np.asarray(g)).max() > 0
  # Central finite difference on one prompt coordinate.
  eps = 1e-2
  bump = lambda s: {"hooks": prompts["hooks"] | {
      "tokens": prompts["hooks"]["tokens"].at[1, 0, 5].add(s)}}
  fd = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
  np.testing.assert_allclose(g[1, 0, 5], fd, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("start", [1, 2])
def test_start_layer_continues_from_the_sown_tokens(start):
  """Entering at layer j with block_{j-1}'s output gives the full model's logits, exactly."""
  base, variables = vpt_jax.load_pretrained(data_path("vitjax_token.npz"))
  full, state = base.apply(variables, IMAGES, mutable=["intermediates"])
  tokens = state["intermediates"]["Transformer"][f"block_{start - 1}"][0]
  resumed = base.apply(variables, tokens, start_layer=start)
  np.testing.assert_array_equal(resumed, full)
  with pytest.raises(ValueError, match="start_layer=1 takes"):
    base.apply(variables, IMAGES, start_layer=1)
  with pytest.raises(ValueError, match="start_layer=3 must be in 0..2"):
    base.apply(variables, tokens, start_layer=3)


class ScaleHooks(EncoderHooks):
  """Doubles layer 1's MLP output and halves the head input: two independent formulas."""

  def mlp_output(self, layer, y, *, train):
    return 2.0 * y if layer == 1 else y

  def head_input(self, x, images, *, train):
    assert images is not None and images.ndim == 4
    return 0.5 * x


def test_mlp_output_and_head_input_hooks_match_numpy():
  model, variables = _hooked(ScaleHooks())
  params = flat(variables["params"])
  got = model.apply(variables, IMAGES, mutable=["intermediates"])[1]["intermediates"]
  expected = numpy_vit.forward(params, IMAGES, patch=4, depth=2, pool="token", cls_row=True,
                               mlp_scale={1: 2.0}, head_input=True)
  close(got["head_input"][0], 0.5 * expected)
