"""ConvNeXt and torchvision ResNet variables from their PyTorch state dicts (exact transposes).

The layout conversions are listed in `vpt_jax.models.convnets`; they live here because weights
depend on models, never the other way round.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.models.convnets import ConvNeXt, ResNet
from vpt_jax.weights.torch import TorchCheckpointError


# ------------------------------------------------------------------------------------------------
# From PyTorch state dicts.


def _blocks(state: Mapping[str, Any], pattern: str, path: str) -> Dict[int, int]:
  """{group: number of blocks} for keys matching `pattern` (two integer groups)."""
  found: Dict[int, set] = {}
  for k in state:
    m = re.match(pattern, k)
    if m:
      found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  out = {}
  for g, idx in found.items():
    if idx != set(range(len(idx))):
      raise TorchCheckpointError(f"{path}: blocks {sorted(idx)} of stage/layer {g} are not "
                                 f"0..{len(idx) - 1}")
    out[g] = len(idx)
  return out


def _need(state: Mapping[str, np.ndarray], key: str, path: str) -> np.ndarray:
  if key not in state:
    raise TorchCheckpointError(f"{path}: missing key {key!r}")
  return state[key]


def _assign(model: nn.Module, image_shape: Tuple[int, ...], mapping: Mapping[Tuple[str, ...], Any],
            state: Mapping[str, np.ndarray], path: str, ignore: Sequence[str]) -> Dict[str, Any]:
  """Variables of `model` from `mapping` {(collection, *path): (file key, convert)}, checked.

  Every variable must be mapped, every file key used or ignored (a regex in `ignore`), and every
  converted array must have the variable's shape and dtype float32.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(image_shape)))
  shapes = {k: v for k, v in shapes.items() if k in ("params", "batch_stats")}
  flat = dict(_flatten(shapes))
  out: Dict[str, Any] = {}
  used = set()
  for where, leaf in flat.items():
    if where not in mapping:
      raise TorchCheckpointError(f"{path}: no file key maps to {'/'.join(where)} (internal)")
    key, convert = mapping[where]
    v = _need(state, key, path)
    used.add(key)
    if v.dtype != np.float32:
      raise TorchCheckpointError(f"{path}: key {key!r} has dtype {v.dtype}; float32 expected")
    a = np.ascontiguousarray(convert(v))
    if a.shape != tuple(leaf.shape):
      raise TorchCheckpointError(f"{path}: key {key!r} has shape {v.shape}, which does not fit "
                                 f"{'/'.join(where)} {tuple(leaf.shape)} of this architecture")
    node = out
    for k in where[:-1]:
      node = node.setdefault(k, {})
    node[where[-1]] = a
  extra = [k for k in state if k not in used and not any(re.fullmatch(p, k) for p in ignore)]
  if extra:
    raise TorchCheckpointError(f"{path}: unexpected key(s) {extra[:6]}"
                               + (f" and {len(extra) - 6} more" if len(extra) > 6 else ""))
  return out


def _flatten(tree: Mapping[str, Any], prefix: Tuple[str, ...] = ()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _flatten(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _hwio(w: np.ndarray) -> np.ndarray:
  return w.transpose(2, 3, 1, 0)


def _same(w: np.ndarray) -> np.ndarray:
  return w


def _linear(w: np.ndarray) -> np.ndarray:
  return w.T


def convnext_from_torch(state: Mapping[str, np.ndarray], *, path: str = "state dict",
                        head: bool = False, **overrides: Any) -> Tuple[ConvNeXt, Dict[str, Any]]:
  """(ConvNeXt, variables) from a ConvNeXt state dict (`read_state_dict(...)` of its file).

  Depths and widths are read off the keys. head=False drops the checkpoint's classifier (as VPT
  does); head=True keeps it as the model's head. `overrides` set other fields (pad prompt, ...).
  """
  depths = _blocks(state, r"^stages\.(\d+)\.(\d+)\.", path)
  if sorted(depths) != [0, 1, 2, 3]:
    raise TorchCheckpointError(f"{path}: expected stages.0 .. stages.3 (ConvNeXt), found "
                               f"{sorted(depths)}")
  dims = [int(_need(state, f"stages.{s}.0.dwconv.weight", path).shape[0]) for s in range(4)]
  num_classes = None
  if head:
    num_classes = int(_need(state, "head.weight", path).shape[0])
  model = ConvNeXt(depths=tuple(depths[s] for s in range(4)), dims=tuple(dims),
                   num_classes=num_classes, **overrides)
  m: Dict[Tuple[str, ...], Any] = {}
  P = lambda where, leaf: ("params", *where.split("/"), leaf)

  def ln(where: str, key: str) -> None:
    m[P(where, "scale")] = (f"{key}.weight", _same)
    m[P(where, "bias")] = (f"{key}.bias", _same)

  def dense(where: str, key: str, convert=_linear) -> None:
    m[P(where, "kernel")] = (f"{key}.weight", convert)
    m[P(where, "bias")] = (f"{key}.bias", _same)

  dense("stem_conv", "downsample_layers.0.0", _hwio)
  ln("stem_norm", "downsample_layers.0.1")
  for s in range(1, 4):
    ln(f"downsample{s}_norm", f"downsample_layers.{s}.0")
    dense(f"downsample{s}_conv", f"downsample_layers.{s}.1", _hwio)
  for s in range(4):
    for j in range(depths[s]):
      w, k = f"stage{s + 1}_{j}", f"stages.{s}.{j}"
      m[P(w, "gamma")] = (f"{k}.gamma", _same)
      dense(f"{w}/dwconv", f"{k}.dwconv", _hwio)  # (C, 1, 7, 7) -> (7, 7, 1, C)
      ln(f"{w}/norm", f"{k}.norm")
      dense(f"{w}/pwconv1", f"{k}.pwconv1")
      dense(f"{w}/pwconv2", f"{k}.pwconv2")
  ln("norm", "norm")
  if head:
    dense("head", "head")
  ignore = [] if head else [r"head\.(weight|bias)"]
  variables = _assign(model, (1, 32, 32, 3), m, state, path, ignore)
  return model, variables


def resnet_from_torch(state: Mapping[str, np.ndarray], *, path: str = "state dict",
                      head: bool = False, **overrides: Any) -> Tuple[ResNet, Dict[str, Any]]:
  """(ResNet, variables) from a torchvision Bottleneck-ResNet state dict (ResNet-50: `fc` 2048).

  Blocks per layer, stem width and planes are read off the keys; `num_batches_tracked` is
  ignored. head=False drops `fc` (as VPT does); head=True keeps it as the model's head.
  """
  blocks = _blocks(state, r"^layer(\d+)\.(\d+)\.", path)
  if sorted(blocks) != [1, 2, 3, 4]:
    raise TorchCheckpointError(f"{path}: expected layer1 .. layer4 (torchvision ResNet), found "
                               f"{sorted(blocks)}")
  if "layer1.0.conv3.weight" not in state:
    raise TorchCheckpointError(f"{path}: no 'layer1.0.conv3.weight': not a Bottleneck ResNet "
                               "(BasicBlock ResNet-18/34 is not supported)")
  stem = int(_need(state, "conv1.weight", path).shape[0])
  planes = tuple(int(_need(state, f"layer{l}.0.conv1.weight", path).shape[0]) for l in range(1, 5))
  num_classes = int(_need(state, "fc.weight", path).shape[0]) if head else None
  model = ResNet(layers=tuple(blocks[l] for l in range(1, 5)), stem_width=stem, planes=planes,
                 num_classes=num_classes, **overrides)
  m: Dict[Tuple[str, ...], Any] = {}

  def bn(where, key):
    m[("params",) + where + ("scale",)] = (f"{key}.weight", _same)
    m[("params",) + where + ("bias",)] = (f"{key}.bias", _same)
    m[("batch_stats",) + where + ("mean",)] = (f"{key}.running_mean", _same)
    m[("batch_stats",) + where + ("var",)] = (f"{key}.running_var", _same)

  m[("params", "conv1", "kernel")] = ("conv1.weight", _hwio)
  bn(("bn1",), "bn1")
  for l in range(1, 5):
    for b in range(blocks[l]):
      w, k = f"layer{l}_{b}", f"layer{l}.{b}"
      for i in (1, 2, 3):
        m[("params", w, f"conv{i}", "kernel")] = (f"{k}.conv{i}.weight", _hwio)
        bn((w, f"bn{i}"), f"{k}.bn{i}")
      m[("params", w, "downsample_conv", "kernel")] = (f"{k}.downsample.0.weight", _hwio)
      bn((w, "downsample_bn"), f"{k}.downsample.1")
  if head:
    m[("params", "head", "kernel")] = ("fc.weight", _linear)
    m[("params", "head", "bias")] = ("fc.bias", _same)
  ignore = [r".*\.num_batches_tracked"] + ([] if head else [r"fc\.(weight|bias)"])
  variables = _assign(model, (1, 64, 64, 3), m, state, path, ignore)
  return model, variables


def pad_prompts_from_vpt(tb: np.ndarray, lr: np.ndarray) -> Dict[str, Any]:
  """'prompts' variables from VPT's NCHW `prompt_embeddings_tb` / `prompt_embeddings_lr`."""
  tb, lr = np.asarray(tb), np.asarray(lr)
  if tb.ndim != 4 or lr.ndim != 4 or tb.shape[2] != lr.shape[3]:
    raise ValueError(f"pad prompts of shapes {tb.shape} / {lr.shape} are not VPT's "
                     "(1, C, 2T, S + 2T) / (1, C, S, 2T)")
  return {"pad_prompt": {"tb": tb.transpose(0, 2, 3, 1), "lr": lr.transpose(0, 2, 3, 1)}}
