"""MAE and MoCo v3 ViTs from their PyTorch files: exact loading, the official VPT outputs.

Fixtures: tests/data/backbones/{mae_vit,mocov3_vit}.* (outputs of the official VPT code). VPT's
pooling options map onto `prompts.attach`'s as: MAE 'original' (mean of prompt and patch outputs)
= pool 'all', 'img_pool' = 'image', 'prompt_pool' = 'prompt'; MoCo (class token) = 'original'.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from conftest import ATOL, RTOL, adam_steps, data_path, jit_apply
from vpt_jax import prompts
from vpt_jax.models import hooks
from vpt_jax.weights import torch_vit as ssl_vit
from vpt_jax.weights import torch as tw

FILES = {"mae": ("mae_vit.pth", "mae_vit.io.npz"), "moco": ("mocov3_vit.pth.tar",
                                                            "mocov3_vit.io.npz")}
# (case, prompt length, deep, our pool, array prefix of the prompt values)
CASES = {
    "mae": [("vpt_shallow", 5, False, "all", "vpt_shallow"),
            ("vpt_deep", 3, True, "all", "vpt_deep"),
            ("vpt_deep_img_pool", 3, True, "image", "vpt_deep"),
            ("vpt_deep_prompt_pool", 3, True, "prompt", "vpt_deep")],
    "moco": [("vpt_shallow", 5, False, "original", "vpt_shallow"),
             ("vpt_deep", 3, True, "original", "vpt_deep")],
}


def bb(name):
  return data_path(os.path.join("backbones", name))


def state(family):
  return tw.read_state_dict(bb(FILES[family][0]))


@pytest.fixture(scope="module", params=sorted(FILES))
def family(request):
  name = request.param
  io = dict(np.load(bb(FILES[name][1])))
  model, params = ssl_vit.vit_from_torch(state(name), family=name, num_heads=4,
                                         path=FILES[name][0])
  model = model.clone(num_classes=10)
  params["head"] = {"kernel": io["head_weight"].T, "bias": io["head_bias"]}
  return dict(name=name, io=io, model=model, params=params,
              images=io["images"].transpose(0, 2, 3, 1))


def check(got, want, what):
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=RTOL, err_msg=what)


def run(model, variables, images):
  logits, st = jit_apply(model, variables, images, mutable=["intermediates"])
  flat = traverse_util.flatten_dict(st["intermediates"], is_leaf=lambda k, x: isinstance(x, tuple))
  return np.asarray(logits), {k[-1]: np.asarray(v[0]) for k, v in flat.items()}


# ------------------------------------------------------------------------------------------------
# Loading.


@pytest.mark.parametrize("name", sorted(FILES))
def test_parameters_bit_identical_to_the_file(name):
  sd = state(name)
  _, params = ssl_vit.vit_from_torch(sd, family=name, num_heads=4)
  same = lambda a, b, what: (np.testing.assert_array_equal(a.shape, b.shape, err_msg=what),
                             _bytes_equal(a, b, what))
  same(params["embedding"]["kernel"].transpose(3, 2, 0, 1), sd["patch_embed.proj.weight"], "pe")
  same(params["embedding"]["bias"], sd["patch_embed.proj.bias"], "pe bias")
  same(params["cls"], sd["cls_token"], "cls")
  same(params["pos_embedding"], sd["pos_embed"], "pos_embed (the file's, not a sin-cos table)")
  for i in range(2):
    blk, k = params["Transformer"][f"encoderblock_{i}"], f"blocks.{i}"
    att = blk["MultiHeadDotProductAttention_0"]
    # Re-fuse: q, k, v rows in that order, each head-major (3, heads, head_dim).
    fused = np.concatenate([att[n]["kernel"].reshape(64, 64).T
                            for n in ("query", "key", "value")])
    same(fused, sd[f"{k}.attn.qkv.weight"], "qkv")
    same(np.concatenate([att[n]["bias"].reshape(64) for n in ("query", "key", "value")]),
         sd[f"{k}.attn.qkv.bias"], "qkv bias")
    same(att["out"]["kernel"].reshape(64, 64).T, sd[f"{k}.attn.proj.weight"], "proj")
    same(att["out"]["bias"], sd[f"{k}.attn.proj.bias"], "proj bias")
    for ours, theirs in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
      same(blk[ours]["scale"], sd[f"{k}.{theirs}.weight"], theirs)
      same(blk[ours]["bias"], sd[f"{k}.{theirs}.bias"], theirs)
    for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      same(blk["MlpBlock_0"][ours]["kernel"].T, sd[f"{k}.mlp.{theirs}.weight"], theirs)
      same(blk["MlpBlock_0"][ours]["bias"], sd[f"{k}.mlp.{theirs}.bias"], theirs)
  leaves = len(traverse_util.flatten_dict(params))
  if name == "moco":
    same(params["Transformer"]["encoder_norm"]["scale"], sd["norm.weight"], "norm")
    same(params["Transformer"]["encoder_norm"]["bias"], sd["norm.bias"], "norm")
    assert leaves == 4 + 2 * 16 + 2 and "head" not in params
  else:
    # VPT's fresh fc_norm, not the file's norm.
    assert "encoder_norm" not in params["Transformer"]
    np.testing.assert_array_equal(params["fc_norm"]["scale"], np.ones(64, np.float32))
    np.testing.assert_array_equal(params["fc_norm"]["bias"], np.zeros(64, np.float32))
    assert leaves == 4 + 2 * 16 + 2


def _bytes_equal(a, b, what):
  assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), what


def test_conversion_options_and_errors():
  sd = state("moco")
  prefixed = {"base_encoder." + k: v for k, v in sd.items()}
  prefixed.update({"momentum_encoder." + k: v * 0 for k, v in sd.items()})
  _, a = ssl_vit.vit_from_torch(sd, family="moco", num_heads=4)
  _, b = ssl_vit.vit_from_torch(prefixed, family="moco", num_heads=4)
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
  with pytest.raises(ValueError, match=r"num_heads=5 does not divide the width 64 of m.pth"):
    ssl_vit.vit_from_torch(sd, family="moco", num_heads=5, path="m.pth")
  with pytest.raises(ValueError, match=r"family='dino'"):
    ssl_vit.vit_from_torch(sd, family="dino", num_heads=4)
  bad = {k: v for k, v in sd.items() if k != "blocks.1.attn.proj.bias"}
  with pytest.raises(tw.TorchCheckpointError, match=r"m.pth: missing key 'blocks.1.attn.proj"):
    ssl_vit.vit_from_torch(bad, family="moco", num_heads=4, path="m.pth")
  bad = dict(sd, **{"blocks.0.attn.qkv.weight": sd["blocks.0.attn.qkv.weight"][:96]})
  with pytest.raises(tw.TorchCheckpointError, match=r"'blocks.0.attn.qkv.weight' has shape "
                                                    r"\(96, 64\); this ViT needs \(192, 64\)"):
    ssl_vit.vit_from_torch(bad, family="moco", num_heads=4, path="m.pth")
  bad = dict(sd, **{"blocks.0.ls1.gamma": np.ones(64, np.float32)})
  with pytest.raises(tw.TorchCheckpointError, match=r"unexpected key\(s\) \['blocks.0.ls1.gamma"):
    ssl_vit.vit_from_torch(bad, family="moco", num_heads=4, path="m.pth")
  # MAE ignores what VPT's strict=False load ignores (norm, decoder, mask token).
  mae = dict(state("mae"), mask_token=np.zeros((1, 1, 64), np.float32),
             **{"decoder_embed.weight": np.zeros((32, 64), np.float32)})
  ssl_vit.vit_from_torch(mae, family="mae", num_heads=4)


# ------------------------------------------------------------------------------------------------
# Outputs against the official VPT code.


@pytest.mark.parametrize("fast_path", [True, False])
def test_plain_outputs(family, fast_path):
  io = family["io"]
  model = family["model"].clone(fast_path=fast_path)
  logits, inter = run(model, {"params": family["params"]}, family["images"])
  check(logits, io["plain/logits"], "logits")
  check(inter["head_input"], io["plain/features"], "features")
  if fast_path:
    return
  check(inter["stem"].reshape(4, 64, 64), io["plain/patch_embed"], "patch_embed")
  for i in range(2):
    check(inter[f"block_{i}"], io["plain/block_outputs"][i], f"block {i}")
  if "plain/pooled" in io:
    check(inter["pooled"], io["plain/pooled"], "pooled")


def test_checkpoint_head_of_moco():
  io = dict(np.load(bb(FILES["moco"][1])))
  sd = state("moco")
  model, params = ssl_vit.vit_from_torch(sd, family="moco", num_heads=4, head=True)
  _bytes_equal(np.ascontiguousarray(params["head"]["kernel"].T), sd["head.weight"], "head")
  _bytes_equal(params["head"]["bias"], sd["head.bias"], "head bias")
  logits, _ = run(model, {"params": params}, io["images"].transpose(0, 2, 3, 1))
  check(logits, io["plain/ckpt_head_logits"], "ckpt_head_logits")


class _FirstLayerInput(hooks.Hooks):
  """Records what encoder layer 0 receives (the fixtures' `plain/tokens_in`)."""

  def layer(self, layer, x, *, num_prompts, train):
    if layer == 0:
      self.sow("intermediates", "tokens_in", x)
    return hooks.LayerInput(x, num_prompts)


def test_tokens_in(family):
  """Class token, then the patches, plus the file's position embedding (class-token row 0)."""
  model = family["model"].clone(hooks=_FirstLayerInput())
  _, inter = run(model, {"params": family["params"]}, family["images"])
  check(inter["tokens_in"], family["io"]["plain/tokens_in"], "tokens_in")


@pytest.mark.parametrize("fast_path", [True, False])
def test_vpt_outputs(family, fast_path):
  io = family["io"]
  for case, length, deep, pool, src in CASES[family["name"]]:
    cfg = prompts.default_config()
    cfg.update(length=length, deep=deep, pool=pool)
    model = prompts.attach(family["model"].clone(fast_path=fast_path), cfg)
    pr = ssl_vit.vpt_prompts_from_official(
        io[f"{src}/prompt_embeddings"], io[f"{src}/deep_prompt_embeddings"] if deep else None)
    logits, inter = run(model, {"params": family["params"], "prompts": pr}, family["images"])
    check(logits, io[f"{case}/logits"], f"{case} logits")
    check(inter["head_input"], io[f"{case}/features"], f"{case} features")
    if not fast_path and f"{case}/block_outputs" in io:
      for i in range(2):
        check(inter[f"block_{i}"], io[f"{case}/block_outputs"][i], f"{case} block {i}")
    if not fast_path and f"{case}/pooled" in io:
      check(inter["pooled"], io[f"{case}/pooled"], f"{case} pooled")


# ------------------------------------------------------------------------------------------------
# Gradients reach the prompts and the head.


def test_training_prompts_and_head_reduces_loss(family):
  cfg = prompts.default_config()
  cfg.update(length=3, deep=True, pool="all" if family["name"] == "mae" else "original")
  model = prompts.attach(family["model"], cfg)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(8, 32, 32, 3)), jnp.float32)
  labels = jnp.arange(8) % 10
  frozen = {k: v for k, v in family["params"].items() if k != "head"}
  trainable = {"prompts": prompts.init_prompts(model, jax.random.PRNGKey(0)),
               "head": family["params"]["head"]}

  def loss_fn(tr):
    logits = model.apply({"params": dict(frozen, head=tr["head"]), "prompts": tr["prompts"]},
                         images)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  losses, g, _ = adam_steps(loss_fn, trainable)
  # both layers' prompts get gradients at the first step
  assert (np.abs(np.asarray(g["prompts"]["hooks"]["tokens"])).max(axis=(1, 2)) > 0).all()
  assert losses[-1] < losses[0] - 0.1, losses


# ------------------------------------------------------------------------------------------------
# E2VPT (key-value prompts, pruning masks) on the same backbones, against float64 numpy. The numpy
# model is first shown to reproduce the official VPT-deep outputs of the fixture, so it is a
# faithful MAE / MoCo forward; E2VPT's additions are then checked against it.

# Which rows the head reads, for our pool names (MAE: then fc_norm; MoCo: the class token).
NP_POOL = {"all": lambda p: lambda t: t[:, 1:].mean(1),
           "image": lambda p: lambda t: t[:, 1 + p:].mean(1),
           "original": lambda p: "token"}


def _np_forward(family, tokens, kv=None, pool="all"):
  """numpy_vit logits with VPT-deep `tokens` (layers, p, D) and extra keys = values `kv`."""
  import numpy_vit
  p = tokens.shape[1]

  def put(t, replace):
    return lambda x: np.concatenate(
        [x[:, :1], np.broadcast_to(np.asarray(t, np.float64), (x.shape[0],) + t.shape),
         x[:, 1 + replace:]], 1)
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(family["params"]).items()}
  extra = None if kv is None else {i: (kv[i].transpose(1, 0, 2),) * 2 for i in range(len(kv))}
  return numpy_vit.forward(flat, family["images"], patch=4, depth=2, pool=NP_POOL[pool](p),
                           cls_row=True, insert={0: put(tokens[0], 0), 1: put(tokens[1], p)},
                           extra_kv=extra, exact_gelu=True)


def _e2vpt(family, **kw):
  cfg = prompts.default_config()
  cfg.update(dict(length=3, deep=True, kv_length=2,
                  pool="all" if family["name"] == "mae" else "original") | kw)
  model = prompts.attach(family["model"], cfg)
  io = family["io"]
  pr = prompts.init_prompts(model, jax.random.PRNGKey(0))
  official = ssl_vit.vpt_prompts_from_official(io["vpt_deep/prompt_embeddings"],
                                               io["vpt_deep/deep_prompt_embeddings"])
  pr = {"hooks": dict(pr["hooks"], tokens=official["hooks"]["tokens"])}
  return model, pr, cfg


def test_numpy_reference_reproduces_the_official_vpt_deep(family):
  tokens = ssl_vit.vpt_prompts_from_official(
      family["io"]["vpt_deep/prompt_embeddings"],
      family["io"]["vpt_deep/deep_prompt_embeddings"])["hooks"]["tokens"]
  got = _np_forward(family, tokens, pool="all" if family["name"] == "mae" else "original")
  check(got, family["io"]["vpt_deep/logits"], "numpy reference, vpt_deep")


def test_e2vpt_key_value_prompts_match_numpy(family):
  model, pr, cfg = _e2vpt(family)
  kv = np.asarray(pr["hooks"]["kv"])
  assert kv.shape == (2, 4, 2, 16)     # (layers, heads, tokens, head_dim), as the official code
  logits, inter = run(model, {"params": family["params"], "prompts": pr}, family["images"])
  assert model.approximate_gelu is False and model.fc_norm == (family["name"] == "mae")
  want = _np_forward(family, np.asarray(pr["hooks"]["tokens"]), kv, cfg.pool)
  check(logits, want, "E2VPT logits")
  # The key-value prompts change the output (an ignored kv would pass the VPT-deep check).
  assert np.abs(want - family["io"]["vpt_deep/logits"]).max() > 1e-2


def test_e2vpt_pruning_masks_match_the_compact_numpy_model(family):
  """Token 1 pruned, segments dropped per token: the masked model is the compact pruned one."""
  pool = "image" if family["name"] == "mae" else "original"  # 'all' reads pruned prompt outputs
  model, pr, cfg = _e2vpt(family, masks=True, segments=4, pool=pool)
  token_mask = np.array([1, 0, 1], np.float32)
  segment_mask = np.array([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], np.float32)
  variables = {"params": family["params"], "prompts": pr,
               **prompts.e2vpt.mask_variables(token_mask, segment_mask)}
  logits, _ = run(model, variables, family["images"])
  tokens = np.asarray(pr["hooks"]["tokens"]) * np.tile(segment_mask, (1, 16))
  kept = tokens[:, token_mask == 1]
  want = _np_forward(family, kept, np.asarray(pr["hooks"]["kv"]), pool)
  check(logits, want, "E2VPT logits with masks")
  unmasked, _ = run(model, {"params": family["params"], "prompts": pr,
                            **prompts.init_masks(model)}, family["images"])
  assert np.abs(unmasked - want).max() > 1e-3   # the masks matter
