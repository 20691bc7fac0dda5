"""The self-supervised PyTorch ViTs of VPT's Table 4 (MAE, MoCo v3) as `VisionTransformer`s.

`vit_from_torch(state, family=..., num_heads=...)` turns a timm-layout state dict (from
`vpt_jax.weights.torch.read_state_dict`) into the model and its 'params', as VPT builds them:

* both: exact erf GELU (`approximate_gelu=False`), LayerNorm eps 1e-6, the file's `pos_embed`
  (1, 1 + N, D) used as it is, class-token row included (`posemb_cls_row=True`; never recomputed:
  MAE and MoCo write their fixed sin-cos tables with different column orders, and the file's value
  is what the official models compute with);
* 'mae' (`vit_mae.VisionTransformer(global_pool=True)` in VPT): the mean of every token but the
  class token (`pool_type='gap_patches'`), then `fc_norm`. VPT deletes the checkpoint's `norm` and
  creates a fresh `fc_norm`, which the pre-training file lacks, so it stays weight 1 / bias 0; the
  file's `norm.*` is ignored. A file that has `fc_norm.*` (a fine-tuned one) supplies it, as
  `load_state_dict(strict=False)` would. Decoder keys and `mask_token` are ignored likewise.
* 'moco' (`VisionTransformerMoCo`): the class token after the file's final `norm`. The linear
  classifier `head.*` of the checkpoint is dropped unless head=True. DistributedDataParallel's
  `module.` prefix is removed by the reader; a pre-training file's `base_encoder.` sub-tree is
  selected (VPT itself reads only linear-classification files, whose keys have no such prefix).

Layout conversions, all exact (transposes and reshapes):
  patch_embed.proj.weight (D, C, p, p) -> embedding/kernel (p, p, C, D)
  blocks.i.attn.qkv.weight (3D, D): rows [0:D] q, [D:2D] k, [2D:3D] v, head h at rows h*hd ...
    -> {query,key,value}/kernel = W[j*D:(j+1)*D].T.reshape(D, H, hd); qkv.bias likewise (H, hd)
  blocks.i.attn.proj.weight (D, D) -> out/kernel = W.T.reshape(H, hd, D)
  Linear (out, in) -> Dense kernel (in, out); LayerNorm weight -> scale.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from vpt_jax.models.vit import VisionTransformer
from vpt_jax.weights.torch import TorchCheckpointError, select

FAMILIES = ("mae", "moco")

# File keys a family's VPT model does not read (strict=False in VPT's loaders).
_IGNORED = {
    "mae": (r"norm\.(weight|bias)", r"decoder_.*", r"mask_token", r"head\..*"),
    "moco": (r"head\..*",),
}


def _need(state: Mapping[str, np.ndarray], key: str, path: str) -> np.ndarray:
  if key not in state:
    raise TorchCheckpointError(f"{path}: missing key {key!r}")
  v = state[key]
  if v.dtype != np.float32:
    raise TorchCheckpointError(f"{path}: key {key!r} has dtype {v.dtype}; float32 expected")
  return v


def _shape(v: np.ndarray, shape: Tuple[int, ...], key: str, path: str) -> np.ndarray:
  if v.shape != shape:
    raise TorchCheckpointError(f"{path}: key {key!r} has shape {v.shape}; this ViT needs {shape}")
  return v


def vit_from_torch(state: Mapping[str, np.ndarray], *, family: str, num_heads: int,
                   path: str = "state dict", head: bool = False,
                   **overrides: Any) -> Tuple[VisionTransformer, Dict[str, Any]]:
  """(VisionTransformer, params) of an MAE or MoCo v3 ViT state dict, as VPT builds the backbone.

  num_heads is not stored in the file (ViT-B: 12; ViT-L/H: 16). head=True keeps the file's
  linear classifier as the model's head (MoCo linear-eval files); otherwise there is none.
  `overrides` set other model fields.
  """
  if family not in FAMILIES:
    raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
  if "base_encoder.cls_token" in state:
    state = select(state, "base_encoder.")
  patch = _need(state, "patch_embed.proj.weight", path)
  if patch.ndim != 4 or patch.shape[2] != patch.shape[3]:
    raise TorchCheckpointError(f"{path}: 'patch_embed.proj.weight' has shape {patch.shape}; a "
                               "square (D, C, p, p) patch-embedding conv expected")
  d, c, p, _ = patch.shape
  if d % num_heads:
    raise ValueError(f"num_heads={num_heads} does not divide the width {d} of {path}")
  hd = d // num_heads
  depth = len({int(m.group(1)) for k in state for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
  if not depth:
    raise TorchCheckpointError(f"{path}: no 'blocks.<i>.' keys: not a timm-layout ViT")
  mlp = _need(state, "blocks.0.mlp.fc1.weight", path).shape[0]
  pos = _need(state, "pos_embed", path)
  side = int(round(np.sqrt(pos.shape[1] - 1))) if pos.ndim == 3 else 0
  if pos.ndim != 3 or side * side + 1 != pos.shape[1] or pos.shape[2] != d:
    raise TorchCheckpointError(f"{path}: 'pos_embed' has shape {pos.shape}; (1, 1 + g*g, {d}) "
                               "with a class-token row expected")
  num_classes = None
  if head:
    num_classes = int(_need(state, "head.weight", path).shape[0])

  used = set()

  def get(key: str, shape: Tuple[int, ...]) -> np.ndarray:
    used.add(key)
    return _shape(_need(state, key, path), shape, key, path)

  def ln(key: str) -> Dict[str, np.ndarray]:
    return {"scale": get(f"{key}.weight", (d,)), "bias": get(f"{key}.bias", (d,))}

  def dense(key: str, n_in: int, n_out: int) -> Dict[str, np.ndarray]:
    return {"kernel": get(f"{key}.weight", (n_out, n_in)).T, "bias": get(f"{key}.bias", (n_out,))}

  params: Dict[str, Any] = {
      "embedding": {"kernel": get("patch_embed.proj.weight", (d, c, p, p)).transpose(2, 3, 1, 0),
                    "bias": get("patch_embed.proj.bias", (d,))},
      "cls": get("cls_token", (1, 1, d)),
      "pos_embedding": get("pos_embed", (1, side * side + 1, d)),
  }
  blocks = {}
  for i in range(depth):
    k = f"blocks.{i}"
    qkv_w = get(f"{k}.attn.qkv.weight", (3 * d, d))
    if f"{k}.attn.qkv.bias" in state:
      qkv_b = get(f"{k}.attn.qkv.bias", (3 * d,))
    else:   # qkv_bias=False: a zero bias computes the same
      qkv_b = np.zeros((3 * d,), np.float32)
    attn = {name: {"kernel": qkv_w[j * d:(j + 1) * d].T.reshape(d, num_heads, hd),
                   "bias": qkv_b[j * d:(j + 1) * d].reshape(num_heads, hd)}
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = {"kernel": get(f"{k}.attn.proj.weight", (d, d)).T.reshape(num_heads, hd, d),
                   "bias": get(f"{k}.attn.proj.bias", (d,))}
    blocks[f"encoderblock_{i}"] = {
        "LayerNorm_0": ln(f"{k}.norm1"),
        "MultiHeadDotProductAttention_0": attn,
        "LayerNorm_1": ln(f"{k}.norm2"),
        "MlpBlock_0": {"Dense_0": dense(f"{k}.mlp.fc1", d, mlp),
                       "Dense_1": dense(f"{k}.mlp.fc2", mlp, d)},
    }
  params["Transformer"] = blocks
  if family == "moco":
    blocks["encoder_norm"] = ln("norm")
  elif "fc_norm.weight" in state:
    params["fc_norm"] = ln("fc_norm")
  else:  # VPT's fresh fc_norm (nn.LayerNorm init), never trained by VPT.
    params["fc_norm"] = {"scale": np.ones((d,), np.float32), "bias": np.zeros((d,), np.float32)}
  if head:
    params["head"] = dense("head", d, num_classes)
  extra = [k for k in state if k not in used
           and not any(re.fullmatch(r, k) for r in _IGNORED[family])]
  if extra:
    raise TorchCheckpointError(f"{path}: unexpected key(s) {extra[:6]}"
                               + (f" and {len(extra) - 6} more" if len(extra) > 6 else ""))
  params = _contiguous(params)
  kw = dict(image_size=(side * p, side * p), patch_size=(p, p), width=d, depth=depth,
            num_heads=num_heads, mlp_dim=mlp, num_classes=num_classes,
            pool_type="gap_patches" if family == "mae" else "token", class_token=True,
            posemb_cls_row=True, in_channels=c, approximate_gelu=False, fc_norm=family == "mae")
  kw.update(overrides)
  return VisionTransformer(**kw), params


def _contiguous(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _contiguous(v) for k, v in tree.items()}
  return np.ascontiguousarray(tree)


def vpt_prompts_from_official(prompt_embeddings: np.ndarray,
                              deep_prompt_embeddings: Optional[np.ndarray] = None
                              ) -> Dict[str, Any]:
  """'prompts' variables of `prompts.attach` from VPT's (1, P, D) `prompt_embeddings` and, for
  VPT-deep, (depth - 1, P, D) `deep_prompt_embeddings` (layer i >= 1 gets entry i - 1)."""
  tokens = np.asarray(prompt_embeddings, np.float32)
  if tokens.ndim != 3 or tokens.shape[0] != 1:
    raise ValueError(f"prompt_embeddings of shape {tokens.shape}; (1, P, D) expected")
  if deep_prompt_embeddings is not None:
    deep = np.asarray(deep_prompt_embeddings, np.float32)
    if deep.ndim != 3 or deep.shape[1:] != tokens.shape[1:]:
      raise ValueError(f"deep_prompt_embeddings of shape {deep.shape}; (depth - 1, "
                       f"{tokens.shape[1]}, {tokens.shape[2]}) expected")
    tokens = np.concatenate([tokens, deep], axis=0)
  return {"hooks": {"tokens": tokens}}
