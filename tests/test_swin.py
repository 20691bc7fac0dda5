"""Swin Transformer and its VPT / E2VPT prompts against the official code's outputs.

Fixtures (tests/data/swin/, see tests/data/README.md): a tiny 4-stage Swin saved by
microsoft/Swin-Transformer, and the outputs of that code (plain), KMnP/vpt (VPT-shallow/deep) and
ChengHan111/E2VPT (key/value prompts + masks). The official prompted code pairs window row r with
the prompts of batch entry r % B; vpt_jax gives each image its own prompts (default) and can
reproduce the official pairing (`batch_order_quirk=True`): both are checked, the default against
the fixtures' single-image outputs and against every array the pairing cannot affect.
Every jitted function is compiled once per module.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ATOL, RTOL, data_path, load_io
from vpt_jax.models import swin
from vpt_jax.prompts import swin as swin_prompts
from vpt_jax.weights import torch_swin
from vpt_jax.weights.torch import read_state_dict

CKPT = "swin/swin_toy_patch2_window3_48.pth"
P = 3  # prompt tokens in every prompted fixture
CASES = {
    "vpt_shallow": dict(length=P),
    "vpt_deep": dict(length=P, deep=True),
    "e2vpt_kv": dict(length=P, deep=True, kv_length=2, masks=True, pieces=4),
}


@pytest.fixture(scope="module")
def state_dict():
  return read_state_dict(data_path(CKPT), key="model")


@pytest.fixture(scope="module")
def plain(state_dict):
  cfg = torch_swin.config_from_state_dict(state_dict, image_size=(48, 48))
  model = swin.SwinTransformer(**cfg)
  return model, torch_swin.convert_state_dict(state_dict, model)


@pytest.fixture(scope="module")
def backbone(state_dict, plain):
  """The backbone as VPT/E2VPT load it: the file's head is dropped (they train a new one)."""
  model = plain[0]
  return model, torch_swin.convert_state_dict(state_dict, model, head=False)


def _images(io):
  return io["images"].transpose(0, 2, 3, 1)


_COMPILED = {}  # one jitted apply per model, shared by the tests of this module


def _run(model, variables, images):
  if model not in _COMPILED:
    _COMPILED[model] = jax.jit(functools.partial(model.apply, mutable=["intermediates"]))
  out, state = _COMPILED[model](variables, images)
  got = {k: np.asarray(v[0]) for k, v in state["intermediates"].items()}
  got["patch_embed"] = got.pop("stem")
  got["logits"] = np.asarray(out)
  return got


def _close(name, got, want):
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=name)
  return float(np.max(np.abs(got - want)))


def _outputs(io):
  return [k for k in io if k != "images" and not k.startswith("params/")
          and not k.endswith("_single") and k != "stage0_input_prompts"]


# -- loading -------------------------------------------------------------------------------------


def test_config_read_off_the_file(plain):
  model = plain[0]
  assert (model.patch_size, model.embed_dim, model.depths, model.num_heads, model.window_size,
          model.mlp_ratio, model.num_classes) == (2, 8, (2, 2, 2, 2), (2, 2, 4, 8), 3, 4.0, 10)
  assert [(s.resolution[0], s.window, s.shift, s.num_windows) for s in model.stages] == [
      (24, 3, 1, 64), (12, 3, 1, 16), (6, 3, 1, 4), (3, 3, 0, 1)]


def test_parameters_bit_identical(state_dict, plain):
  model, params = plain
  back = torch_swin.to_state_dict(params, model)
  buffers = {k for k in state_dict if k.endswith((".relative_position_index", ".attn_mask"))}
  assert set(back) == set(state_dict) - buffers and len(back) == 121 and len(buffers) == 11
  for k, v in back.items():
    assert v.dtype == np.float32 and v.shape == state_dict[k].shape, k
    assert np.array_equal(v.view(np.uint32), state_dict[k].view(np.uint32)), k
  # The documented layout conversions, spelled out for one leaf of each kind.
  blk = params["layers_1"]["blocks_0"]
  assert np.array_equal(blk["attn"]["qkv"]["kernel"],
                        state_dict["layers.1.blocks.0.attn.qkv.weight"].T)
  assert np.array_equal(params["patch_embed"]["proj"]["kernel"],
                        state_dict["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  assert np.array_equal(blk["norm2"]["scale"], state_dict["layers.1.blocks.0.norm2.weight"])
  assert np.array_equal(params["layers_0"]["downsample"]["reduction"]["kernel"],
                        state_dict["layers.0.downsample.reduction.weight"].T)


def test_buffers_recomputed_equal_the_files(state_dict, plain):
  model = plain[0]
  n = 0
  for i, st in enumerate(model.stages):
    for j in range(st.depth):
      key = f"layers.{i}.blocks.{j}"
      index = state_dict[f"{key}.attn.relative_position_index"]
      assert index.dtype == np.int64
      assert np.array_equal(swin.relative_position_index(st.window), index), key
      shift = st.block_shift(j)
      assert (f"{key}.attn_mask" in state_dict) == (shift > 0), key
      if shift:
        assert np.array_equal(swin.attention_mask(st.resolution, st.window, shift),
                              state_dict[f"{key}.attn_mask"]), key
        n += 1
  assert n == 3


@pytest.mark.parametrize("key", ["layers.2.blocks.1.attn.relative_position_index",
                                 "layers.0.blocks.1.attn_mask"])
def test_corrupt_buffer_is_named(state_dict, plain, key):
  bad = dict(state_dict)
  bad[key] = np.array(bad[key])
  bad[key].flat[1] += 1
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    torch_swin.convert_state_dict(bad, plain[0])
  torch_swin.convert_state_dict(bad, plain[0], check_buffers=False)  # the opt-out


def test_wrong_image_size_is_caught_by_the_mask_buffer(state_dict):
  cfg = torch_swin.config_from_state_dict(state_dict, image_size=(96, 96))
  with pytest.raises(ValueError, match=r"layers\.0\.blocks\.1\.attn_mask"):
    torch_swin.convert_state_dict(state_dict, swin.SwinTransformer(**cfg))


def test_bad_keys_are_named(state_dict, plain):
  model = plain[0]
  missing = {k: v for k, v in state_dict.items() if k != "layers.1.blocks.1.mlp.fc2.bias"}
  with pytest.raises(ValueError, match=r"missing key.*layers\.1\.blocks\.1\.mlp\.fc2\.bias"):
    torch_swin.convert_state_dict(missing, model)
  with pytest.raises(ValueError, match=r"unexpected key.*layers\.4\.blocks\.0\.norm1\.weight"):
    torch_swin.convert_state_dict({**state_dict, "layers.4.blocks.0.norm1.weight": np.ones(8)},
                                  model)
  shaped = {**state_dict, "norm.bias": np.ones(63, np.float32)}
  with pytest.raises(ValueError, match=r"'norm\.bias' has shape \(63,\)"):
    torch_swin.convert_state_dict(shaped, model)
  with pytest.raises(ValueError, match=r"missing key 'patch_embed\.proj\.weight'"):
    torch_swin.config_from_state_dict({"a": np.ones(1)}, image_size=(48, 48), source="x.pth")


def test_geometry_errors():
  with pytest.raises(ValueError, match="not a multiple of the window"):
    swin.stages((20, 20), 8, (2, 2), (2, 2), 3)
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    swin.stages((24, 24), 8, (2,), (3,), 3)


# -- plain ---------------------------------------------------------------------------------------


def test_plain_matches_microsoft(plain):
  model, params = plain
  io = load_io("swin/plain.io.npz")
  got = _run(model, {"params": params}, _images(io))
  worst = max(_close(k, got[k], io[k]) for k in _outputs(io))
  assert len(_outputs(io)) == 15 and worst < ATOL


def test_load_pretrained_drops_or_keeps_the_head():
  model, params = torch_swin.load_pretrained(data_path(CKPT), image_size=(48, 48))
  assert model.num_classes == 10 and np.any(params["head"]["kernel"])
  model, params = torch_swin.load_pretrained(data_path(CKPT), image_size=(48, 48), num_classes=None)
  assert model.num_classes is None and "head" not in params
  model, params = torch_swin.load_pretrained(data_path(CKPT), image_size=(48, 48), num_classes=5)
  assert params["head"]["kernel"].shape == (64, 5) and not np.any(params["head"]["kernel"])


# -- prompts -------------------------------------------------------------------------------------


def _prompted(case, backbone, *, quirk, fast_path):
  model, params = backbone
  io = load_io(f"swin/{case}.io.npz")
  arrays = {k[len("params/"):]: v for k, v in io.items() if k.startswith("params/")}
  m = swin_prompts.attach(model, batch_order_quirk=quirk, **CASES[case]).clone(
      fast_path=fast_path)
  prompts, head = swin_prompts.from_official(arrays, m, source=case)
  return m, {"params": {**params, "head": head}, "prompts": prompts}, io


@pytest.mark.parametrize("case", list(CASES))
def test_official_batch_outputs_with_the_quirk(case, backbone):
  """batch_order_quirk=True reproduces every stored array of the official batch-of-4 run."""
  model, variables, io = _prompted(case, backbone, quirk=True, fast_path=False)
  got = _run(model, variables, _images(io))
  for k in _outputs(io):
    _close(f"{case}/{k}", got[k], io[k])
  first = model.bind(variables).hooks.first_prompts()
  _close(f"{case}/stage0_input_prompts", np.broadcast_to(first, io["stage0_input_prompts"].shape),
         io["stage0_input_prompts"])


@pytest.mark.parametrize("case", list(CASES))
def test_per_image_prompts(case, backbone):
  """Default (per-image, fast path): equal to each image run alone, and to every batch array
  that the official window/prompt pairing cannot affect (patch rows up to the first block whose
  input prompts differ between images; everything downstream in deep cases)."""
  model, variables, io = _prompted(case, backbone, quirk=False, fast_path=True)
  got = _run(model, variables, _images(io))
  _close(f"{case}/pooled_single", got["pooled"], io["pooled_single"])
  _close(f"{case}/logits_single", got["logits"], io["logits_single"])
  if case == "vpt_shallow":
    # Block 0 sees the same prompts in every window either way: its patch rows agree.
    _close("vpt_shallow/block_0_0 patches", got["block_0_0"][:, P:], io["block_0_0"][:, P:])
    assert np.abs(got["logits"] - io["logits"]).max() > 0.05  # the official batch mixes images
    return
  # Deep: the prompts entering every block are the same for every image, and the last stage has
  # one window, so patch rows everywhere and the whole last block / pooling agree.
  for k in _outputs(io):
    want = io[k]
    n = want.shape[1] - P if want.ndim == 3 else None
    if k in ("block_3_1", "final_norm", "pooled", "logits"):
      _close(f"{case}/{k}", got[k], want)
    else:  # the fast path computes no prompt rows here (the next block replaces them)
      _close(f"{case}/{k} patches", got[k][:, -n:], want[:, P:])


def test_per_image_outputs_do_not_depend_on_the_batch(backbone):
  model, variables, io = _prompted("vpt_shallow", backbone, quirk=False, fast_path=True)
  images = _images(io)
  batch = _run(model, variables, images)["logits"]
  shuffled = _run(model, variables, np.ascontiguousarray(images[::-1]))["logits"][::-1]
  np.testing.assert_allclose(shuffled, batch, atol=ATOL, rtol=RTOL)
  quirk, variables, _ = _prompted("vpt_shallow", backbone, quirk=True, fast_path=False)
  official = _run(quirk, variables, images)["logits"]
  shuffled = _run(quirk, variables, np.ascontiguousarray(images[::-1]))["logits"][::-1]
  assert np.abs(shuffled - official).max() > 0.01  # the official pairing mixes the batch


def test_prompts_are_a_separate_collection(backbone):
  model = swin_prompts.attach(backbone[0], **CASES["e2vpt_kv"])
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 48, 48, 3))))
  prompts = variables["prompts"]["hooks"]
  assert prompts["deep_prompt_embeddings_0"].shape == (1, P, 8)
  assert prompts["deep_prompt_embeddings_3"].shape == (2, P, 64)
  assert prompts["kv_2_1"].shape == (4, 2, 8)
  assert prompts["piece_mask"].shape == (P, 4)
  assert not any("hooks" in k for k in variables["params"])
  with pytest.raises(ValueError, match="pieces=3 must divide"):
    swin_prompts.attach(backbone[0], length=2, masks=True, pieces=3)
  with pytest.raises(ValueError, match=r"key 'enc\.bogus'"):
    swin_prompts.from_official({"enc.bogus": np.ones(3)}, model)
