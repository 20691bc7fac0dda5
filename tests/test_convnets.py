"""ConvNeXt and ResNet from their PyTorch files: exact loading, official VPT outputs, pad prompts.

Fixtures: tests/data/backbones/{convnext,resnet}.* (outputs of the official VPT code, NCHW).
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from conftest import ATOL, RTOL, data_path
from vpt_jax.models import convnets as cn
from vpt_jax.weights import torch_convnets as tc
from vpt_jax.weights import torch as tw

FILES = {"convnext": "convnext.pth", "resnet": "resnet.pth"}
FROM = {"convnext": tc.convnext_from_torch, "resnet": tc.resnet_from_torch}
STAGES = {"convnext": ["stem", "stage1", "stage2", "stage3", "stage4", "pooled", "features"],
          "resnet": ["stem", "layer1", "layer2", "layer3", "layer4", "features"]}


def bb(name):
  return data_path(os.path.join("backbones", name))


def state(family):
  return tw.read_state_dict(bb(FILES[family]))


@pytest.fixture(scope="module", params=sorted(FILES))
def family(request):
  name = request.param
  io = dict(np.load(bb(f"{name}.io.npz")))
  model, variables = FROM[name](state(name), path=FILES[name])
  model = model.clone(num_classes=10)
  variables["params"]["head"] = {"kernel": io["head_weight"].T, "bias": io["head_bias"]}
  run = jax.jit(lambda m, v, x: m.apply(v, x, mutable=["intermediates"]), static_argnums=0)
  return dict(name=name, io=io, model=model, variables=variables, run=run,
              images=io["images"].transpose(0, 2, 3, 1))


def nchw(a):
  a = np.asarray(a)
  return a.transpose(0, 3, 1, 2) if a.ndim == 4 else a


def check(got, want, what):
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=what)


def outputs(fam, model, variables):
  logits, st = fam["run"](model, variables, fam["images"])
  return np.asarray(logits), {k: nchw(v[0]) for k, v in st["intermediates"].items()}


# ------------------------------------------------------------------------------------------------
# Loading.

# File key -> (collection, flax path, inverse of the layout conversion), written independently of
# the converters: a regex per key family.
_INVERSE = {
    "hwio": lambda a: a.transpose(3, 2, 0, 1) if a.ndim == 4 else a,
    "linear": lambda a: a.T, "same": lambda a: a}
_CONVNEXT_RULES = [
    (r"downsample_layers\.0\.0\.(weight|bias)", "stem_conv", "hwio"),
    (r"downsample_layers\.0\.1\.(weight|bias)", "stem_norm", "same"),
    (r"downsample_layers\.(\d)\.0\.(weight|bias)", "downsample{0}_norm", "same"),
    (r"downsample_layers\.(\d)\.1\.(weight|bias)", "downsample{0}_conv", "hwio"),
    (r"stages\.(\d)\.(\d+)\.gamma", "stage{s}_{1}", "same"),
    (r"stages\.(\d)\.(\d+)\.dwconv\.(weight|bias)", "stage{s}_{1}/dwconv", "hwio"),
    (r"stages\.(\d)\.(\d+)\.norm\.(weight|bias)", "stage{s}_{1}/norm", "same"),
    (r"stages\.(\d)\.(\d+)\.(pwconv\d)\.(weight|bias)", "stage{s}_{1}/{2}", "linear"),
    (r"norm\.(weight|bias)", "norm", "same"),
]
_RESNET_RULES = [
    (r"conv1\.weight", "conv1", "hwio"),
    (r"bn1\.(\w+)", "bn1", "same"),
    (r"layer(\d)\.(\d+)\.(conv\d)\.weight", "layer{0}_{1}/{2}", "hwio"),
    (r"layer(\d)\.(\d+)\.(bn\d)\.(\w+)", "layer{0}_{1}/{2}", "same"),
    (r"layer(\d)\.(\d+)\.downsample\.0\.weight", "layer{0}_{1}/downsample_conv", "hwio"),
    (r"layer(\d)\.(\d+)\.downsample\.1\.(\w+)", "layer{0}_{1}/downsample_bn", "same"),
]
_LEAF = {"weight": ("params", None), "bias": ("params", "bias"), "gamma": ("params", "gamma"),
         "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def _where(name, key):
  rules = _CONVNEXT_RULES if name == "convnext" else _RESNET_RULES
  for pattern, fmt, conv in rules:
    m = re.fullmatch(pattern, key)
    if m:
      g = m.groups()
      s = str(int(g[0]) + 1) if name == "convnext" and key.startswith("stages") else ""
      module = fmt.format(*g, s=s)
      leaf = key.rsplit(".", 1)[1]
      col, var = _LEAF[leaf]
      if var is None:
        var = "scale" if conv == "same" else "kernel"
      return col, f"{module}/{var}" if leaf != "gamma" else f"{module}/gamma", conv
  return None


@pytest.mark.parametrize("name", sorted(FILES))
def test_parameters_bit_identical_to_the_file(name):
  sd = state(name)
  _, variables = FROM[name](sd, path=FILES[name])
  flat = {c: {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(t).items()}
          for c, t in variables.items()}
  seen = 0
  for key, tensor in sd.items():
    where = _where(name, key)
    if where is None:
      assert key.startswith(("head.", "fc.")), key   # VPT replaces the classifier
      continue
    col, path, conv = where
    got = _INVERSE[conv](flat[col][path])
    assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
    assert got.tobytes() == tensor.tobytes(), key
    seen += 1
  assert seen == sum(len(t) for t in flat.values())    # every variable came from the file


def test_resnet_legacy_tar_and_zip_load_the_same():
  _, a = tc.resnet_from_torch(state("resnet"))
  _, b = tc.resnet_from_torch(tw.read_state_dict(bb("resnet.zipformat.pth")))
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert fa.keys() == fb.keys()
  assert all(np.asarray(fa[k]).tobytes() == np.asarray(fb[k]).tobytes() for k in fa)


def test_conversion_errors():
  sd = state("resnet")
  bad = dict(sd)
  del bad["layer2.0.bn2.running_var"]
  with pytest.raises(tw.TorchCheckpointError, match=r"r.pth: missing key "
                                                    r"'layer2.0.bn2.running_var'"):
    tc.resnet_from_torch(bad, path="r.pth")
  bad = dict(sd, **{"layer1.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(tw.TorchCheckpointError, match=r"unexpected key\(s\) \['layer1.0.extra"):
    tc.resnet_from_torch(bad, path="r.pth")
  bad = dict(sd, **{"layer3.0.conv2.weight": np.zeros((16, 16, 1, 1), np.float32)})
  with pytest.raises(tw.TorchCheckpointError, match=r"'layer3.0.conv2.weight' has shape "
                                                    r"\(16, 16, 1, 1\)"):
    tc.resnet_from_torch(bad, path="r.pth")
  with pytest.raises(tw.TorchCheckpointError, match=r"c.pth: expected stages.0 .. stages.3"):
    tc.convnext_from_torch(sd, path="c.pth")
  cx = dict(state("convnext"))
  cx["norm.weight"] = cx["norm.weight"].astype(np.float16)
  with pytest.raises(tw.TorchCheckpointError, match=r"'norm.weight' has dtype float16"):
    tc.convnext_from_torch(cx, path="c.pth")


# ------------------------------------------------------------------------------------------------
# Outputs against the official VPT code.


def test_plain_outputs(family):
  io = family["io"]
  logits, inter = outputs(family, family["model"], family["variables"])
  for k in STAGES[family["name"]]:
    check(inter[k], io[f"plain/{k}"], k)
  check(logits, io["plain/logits"], "logits")


def test_checkpoint_head(family):
  name = family["name"]
  sd = state(name)
  model, variables = FROM[name](sd, path=FILES[name], head=True)
  key = "head" if name == "convnext" else "fc"   # loaded bit for bit too (Dense kernel = W.T)
  head = variables["params"]["head"]
  assert np.ascontiguousarray(head["kernel"].T).tobytes() == sd[f"{key}.weight"].tobytes()
  assert np.asarray(head["bias"]).tobytes() == sd[f"{key}.bias"].tobytes()
  logits, _ = outputs(family, model, variables)
  check(logits, family["io"]["plain/ckpt_head_logits"], "ckpt_head_logits")


def test_pad_prompt_outputs(family):
  io = family["io"]
  model = family["model"].clone(pad_tokens=4)
  variables = dict(family["variables"], prompts=tc.pad_prompts_from_vpt(
      io["vpt_pad/prompt_embeddings_tb"], io["vpt_pad/prompt_embeddings_lr"]))
  logits, inter = outputs(family, model, variables)
  check(inter["input"][:1], io["vpt_pad/padded_input"], "padded_input")
  for k in STAGES[family["name"]]:
    check(inter[k], io[f"vpt_pad/{k}"], k)
  check(logits, io["vpt_pad/logits"], "logits")


def test_pad_geometry_against_numpy():
  """Independent numpy assembly: tb owns the corners, lr[..., :T] left, normalised prompts."""
  rng = np.random.default_rng(0)
  t, s = 2, 5
  tb, lr = rng.uniform(size=(1, 3, 2 * t, s + 2 * t)), rng.uniform(size=(1, 3, s, 2 * t))
  img = rng.normal(size=(2, 3, s, s))
  mean, std = np.array(cn.IMAGENET_MEAN)[:, None, None], np.array(cn.IMAGENET_STD)[:, None, None]
  tbn, lrn = (tb[0] - mean) / std, (lr[0] - mean) / std
  want = np.zeros((2, 3, s + 2 * t, s + 2 * t))
  want[:, :, :t, :] = tbn[:, :t]
  want[:, :, s + t:, :] = tbn[:, t:]
  want[:, :, t:s + t, :t] = lrn[:, :, :t]
  want[:, :, t:s + t, s + t:] = lrn[:, :, t:]
  want[:, :, t:s + t, t:s + t] = img
  prompt = cn.PadPrompt(t)
  got = prompt.apply({"prompts": {k: v.astype(np.float32) for k, v in
                                  tc.pad_prompts_from_vpt(tb, lr)["pad_prompt"].items()}},
                     img.transpose(0, 2, 3, 1).astype(np.float32))
  np.testing.assert_allclose(nchw(got), want, atol=1e-6)
  with pytest.raises(ValueError, match=r"fit another input size; these images are 6x6x3"):
    prompt.apply({"prompts": tc.pad_prompts_from_vpt(tb, lr)["pad_prompt"]},
                 np.zeros((1, 6, 6, 3), np.float32))
