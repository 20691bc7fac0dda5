"""Swin Transformer variables from the published microsoft/Swin-Transformer `.pth` files.

Exact: transposes only (listed in `_LEAVES`); the files' `relative_position_index` and `attn_mask`
buffers are checked against the ones `vpt_jax.models.swin` recomputes, naming the key on a
mismatch. Errors are `TorchCheckpointError`s (a `CheckpointError`) naming the file and key.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.models.swin import SwinTransformer, attention_mask, relative_position_index
from vpt_jax.weights.torch import TorchCheckpointError, read_state_dict

_Error = TorchCheckpointError


# -- loading the published torch files -----------------------------------------------------------

# torch key suffix -> (linen leaf, layout conversion, inverse); a torch Linear is y = x W^T + b.
_LEAVES = {
    "weight@linear": ("kernel", lambda a: a.T, lambda a: a.T),
    "weight@conv": ("kernel", lambda a: a.transpose(2, 3, 1, 0), lambda a: a.transpose(3, 2, 0, 1)),
    "weight@norm": ("scale", lambda a: a, lambda a: a),
    "bias": ("bias", lambda a: a, lambda a: a),
    "relative_position_bias_table": ("relative_position_bias_table", lambda a: a, lambda a: a),
}


def _torch_parameters(model: SwinTransformer, head: bool) -> Dict[str, Tuple[Tuple[str, ...], str]]:
  """Every torch parameter key of `model` -> (linen path, leaf kind), in the file's order."""
  out = {}

  def module(torch_prefix, path, kind, bias=True):
    out[f"{torch_prefix}.weight"] = (path, f"weight@{kind}")
    if bias:
      out[f"{torch_prefix}.bias"] = (path, "bias")

  module("patch_embed.proj", ("patch_embed", "proj"), "conv")
  module("patch_embed.norm", ("patch_embed", "norm"), "norm")
  all_stages = model.stages
  for i, st in enumerate(all_stages):
    for j in range(st.depth):
      t, p = f"layers.{i}.blocks.{j}", (f"layers_{i}", f"blocks_{j}")
      module(f"{t}.norm1", p + ("norm1",), "norm")
      out[f"{t}.attn.relative_position_bias_table"] = (p + ("attn",),
                                                       "relative_position_bias_table")
      module(f"{t}.attn.qkv", p + ("attn", "qkv"), "linear")
      module(f"{t}.attn.proj", p + ("attn", "proj"), "linear")
      module(f"{t}.norm2", p + ("norm2",), "norm")
      module(f"{t}.mlp.fc1", p + ("mlp", "fc1"), "linear")
      module(f"{t}.mlp.fc2", p + ("mlp", "fc2"), "linear")
    if i < len(all_stages) - 1:
      t, p = f"layers.{i}.downsample", (f"layers_{i}", "downsample")
      module(f"{t}.reduction", p + ("reduction",), "linear", bias=False)
      module(f"{t}.norm", p + ("norm",), "norm")
  module("norm", ("norm",), "norm")
  if head:
    module("head", ("head",), "linear")
  return out


def _torch_buffers(model: SwinTransformer) -> Dict[str, np.ndarray]:
  """The derivable buffers a published file holds for `model`, recomputed."""
  out = {}
  for i, st in enumerate(model.stages):
    index = relative_position_index(st.window)
    for j in range(st.depth):
      t = f"layers.{i}.blocks.{j}"
      out[f"{t}.attn.relative_position_index"] = index
      if st.block_shift(j):
        out[f"{t}.attn_mask"] = attention_mask(st.resolution, st.window, st.block_shift(j))
  return out


def config_from_state_dict(state_dict: Mapping[str, np.ndarray], *,
                           image_size: Tuple[int, int], source: str = "state dict") -> dict:
  """SwinTransformer keyword arguments read off a torch state dict (microsoft key names).

  image_size cannot be read off the parameters; the converter then checks it against the
  attention-mask buffers when the file has them.
  """
  def get(key):
    if key not in state_dict:
      raise _Error(f"{source}: missing key {key!r}; not a microsoft/Swin-Transformer state "
                       "dict (keys like 'patch_embed.proj.weight', 'layers.0.blocks.0.attn.qkv."
                       "weight')")
    return np.asarray(state_dict[key])

  embed_dim, in_channels, patch, _ = get("patch_embed.proj.weight").shape
  depths, num_heads = [], []
  while f"layers.{len(depths)}.blocks.0.norm1.weight" in state_dict:
    i, j = len(depths), 0
    while f"layers.{i}.blocks.{j}.norm1.weight" in state_dict:
      j += 1
    depths.append(j)
    num_heads.append(get(f"layers.{i}.blocks.0.attn.relative_position_bias_table").shape[1])
  if not depths:
    get("layers.0.blocks.0.norm1.weight")
  table = get("layers.0.blocks.0.attn.relative_position_bias_table").shape[0]
  window = (int(round(np.sqrt(table))) + 1) // 2
  mlp_ratio = get("layers.0.blocks.0.mlp.fc1.weight").shape[0] / embed_dim
  head = state_dict.get("head.weight")
  return dict(image_size=tuple(int(s) for s in image_size), patch_size=int(patch),
              embed_dim=int(embed_dim), depths=tuple(depths), num_heads=tuple(int(h) for h in
                                                                              num_heads),
              window_size=window, mlp_ratio=mlp_ratio, in_channels=int(in_channels),
              num_classes=None if head is None else int(np.asarray(head).shape[0]))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: SwinTransformer, *,
                       head: Optional[bool] = None, check_buffers: bool = True,
                       source: str = "state dict") -> dict:
  """The linen 'params' of `model` from a microsoft/Swin-Transformer state dict, values exact.

  Layout conversions (value-preserving, so parameters stay bit-identical): Linear weights (out, in)
  are transposed to Dense kernels (in, out); the conv weight OIHW becomes HWIO; LayerNorm `weight`
  is `scale`; the fused qkv keeps its [q | k | v] head-major output channels. The
  `relative_position_index` and `attn_mask` buffers are recomputed and must equal the file's
  (check_buffers=False skips that, e.g. for a file saved at another resolution).

  head: load `head.*` (default: when the model has a head of the file's size); False drops them,
    as VPT/E2VPT do (their head is new). Every other unknown or missing key is an error.
  """
  if head is None:
    w = state_dict.get("head.weight")
    head = bool(model.num_classes) and w is not None and np.shape(w)[0] == model.num_classes
  if head and not model.num_classes:
    raise _Error(f"{source}: head=True but the model has no head (num_classes=None)")
  wanted = _torch_parameters(model, head=head)
  buffers = _torch_buffers(model)
  ignored = {"head.weight", "head.bias"} if not head else set()
  unknown = sorted(k for k in state_dict if k not in wanted and k not in ignored
                   and not k.endswith((".relative_position_index", ".attn_mask")))
  unexpected_buffers = sorted(k for k in state_dict
                              if k.endswith((".relative_position_index", ".attn_mask"))
                              and k not in buffers)
  if unknown or unexpected_buffers:
    bad = unknown + unexpected_buffers
    raise _Error(f"{source}: unexpected key(s) {bad[:8]}{' ...' if len(bad) > 8 else ''} for "
                     f"a Swin with depths {tuple(model.depths)} at image_size "
                     f"{tuple(model.image_size)} (a buffer for a block that has none means "
                     "another resolution or window)")
  missing = [k for k in wanted if k not in state_dict]
  if missing:
    raise _Error(f"{source}: missing key(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
  if check_buffers:
    for k, want in buffers.items():
      if k not in state_dict:
        continue  # loaders may drop them (microsoft's load_pretrained does)
      got = np.asarray(state_dict[k])
      if got.shape != want.shape or not np.array_equal(got, want):
        raise _Error(f"{source}: buffer {k!r} {got.shape} differs from the one recomputed "
                         f"for image_size {tuple(model.image_size)}, window "
                         f"{model.window_size} {want.shape} (wrong image_size or window, or a "
                         "corrupt file; check_buffers=False skips this check)")
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *model.image_size, model.in_channels))))["params"]
  params: dict = {}
  for k, (path, kind) in wanted.items():
    name, fwd, _ = _LEAVES[kind]
    value = np.asarray(state_dict[k])
    if value.dtype.kind != "f":
      raise _Error(f"{source}: key {k!r} has dtype {value.dtype}; expected a float tensor")
    value = np.ascontiguousarray(fwd(value.astype(np.float32)))
    node = shapes
    for part in path + (name,):
      if not isinstance(node, Mapping) or part not in node:
        node = None
        break
      node = node[part]
    if node is None:
      raise _Error(f"{source}: key {k!r} has no place in this model")  # pragma: no cover
    if tuple(node.shape) != value.shape:
      raise _Error(f"{source}: key {k!r} has shape {np.shape(state_dict[k])}; this model "
                       f"needs {tuple(_LEAVES[kind][2](np.empty(node.shape)).shape)}")
    d = params
    for part in path:
      d = d.setdefault(part, {})
    d[name] = value
  return params


def to_state_dict(params: Mapping, model: SwinTransformer) -> Dict[str, np.ndarray]:
  """The inverse of `convert_state_dict` (parameters only), in microsoft's key names."""
  head = "head" in params
  out = {}
  for k, (path, kind) in _torch_parameters(model, head=head).items():
    name, _, inv = _LEAVES[kind]
    node = params
    for part in path + (name,):
      node = node[part]
    out[k] = np.ascontiguousarray(inv(np.asarray(node)))
  return out


def load_pretrained(path: str, *, image_size: Tuple[int, int], key: Optional[str] = "model",
                    num_classes: Optional[int] = -1, check_buffers: bool = True,
                    **model_kwargs) -> Tuple[SwinTransformer, dict]:
  """(model, params) from a published Swin `.pth` file, read without torch.

  num_classes: -1 keeps the file's head; None drops it (features only, as VPT/E2VPT build the
    backbone); any other number makes a new zero-initialised head of that size.
  """
  state_dict = read_state_dict(path, key=key)
  cfg = config_from_state_dict(state_dict, image_size=image_size, source=path)
  keep_head = num_classes == -1 and cfg["num_classes"] is not None
  if num_classes != -1:
    cfg["num_classes"] = num_classes
  cfg.update(model_kwargs)
  model = SwinTransformer(**cfg)
  params = convert_state_dict(state_dict, model, head=keep_head, check_buffers=check_buffers,
                              source=path)
  if model.num_classes and not keep_head:
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, *model.image_size, model.in_channels))))["params"]
    params["head"] = {k: np.zeros(v.shape, np.float32) for k, v in shapes["head"].items()}
  return model, params
