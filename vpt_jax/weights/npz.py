"""Reading the original ViT checkpoints into `VisionTransformer`, exactly.

Two published layouts are read as they are on disk:

* google-research/vision_transformer (`vit_jax`): flat '/'-joined keys, pre-Linen module names in
  the blocks (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`), the position
  embedding at `Transformer/posembed_input/pos_embedding` with the class-token row first.
* google-research/big_vision: Linen names, optional `params/` or `opt/target/` prefix, a sub-tree
  selected by a `:name` suffix (SigLIP: `file.npz:img`), blocks either per layer
  (`encoderblock_{i}`) or scan-stacked (`encoderblock` with a leading layer axis), a top-level
  `pos_embedding` without class-token row, MAP heads.

Everything about the architecture is inferred from the file. Every stored array ends up in the
parameter tree bit for bit (float32; bfloat16 files are widened exactly); the one deliberate
difference from big_vision's loader is that a vit_jax class-token row stays in `pos_embedding`
(`posemb_cls_row=True`) instead of being summed into `cls`, so nothing is recomputed.

Errors are `CheckpointError`s that name the file and the key as it is spelled in the file.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import zipfile
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from vpt_jax import utils
from vpt_jax.models.vit import VisionTransformer, as_pair
from vpt_jax.weights.download import CheckpointError, resolve

Params = Dict[str, Any]

# Module names inside a block: pre-Linen name (one counter shared by all submodules) -> Linen name.
_PRE_LINEN = {
    "LayerNorm_0": "LayerNorm_0",
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}
_LINEN_TO_PRE = {v: k for k, v in _PRE_LINEN.items()}
_PREFIXES = ("params/", "opt/target/")
_OLD_POSEMB_KEYS = ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding")
_MAP_INLINE = ("probe", "MlpBlock_0", "MultiHeadDotProductAttention_0", "LayerNorm_0")
_BLOCK_RE = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")
_SCAN_RE = re.compile(r"^Transformer/encoderblock/(.+)$")


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What `infer_architecture` reads off a checkpoint's keys and shapes."""

  patch_size: Tuple[int, int]
  in_channels: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  grid: Tuple[int, int]
  pool_type: str                      # 'token' | 'gap' | 'map'
  class_token: bool
  posemb_cls_row: bool
  representation_size: Optional[int]
  num_classes: Optional[int]
  map_num_heads: Optional[int] = None
  map_mlp_dim: Optional[int] = None

  @property
  def image_size(self) -> Tuple[int, int]:
    return (self.grid[0] * self.patch_size[0], self.grid[1] * self.patch_size[1])

  def model(self, **overrides: Any) -> VisionTransformer:
    """The `VisionTransformer` that this checkpoint's parameters fit (fields may be overridden)."""
    kw = dict(image_size=self.image_size, patch_size=self.patch_size, width=self.width,
              depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
              num_classes=self.num_classes, pool_type=self.pool_type,
              class_token=self.class_token, posemb_cls_row=self.posemb_cls_row,
              representation_size=self.representation_size, map_num_heads=self.map_num_heads,
              map_mlp_dim=self.map_mlp_dim, in_channels=self.in_channels)
    kw.update(overrides)
    return VisionTransformer(**kw)


# ------------------------------------------------------------------------------------------------
# Reading the archive.


def read_npz(path: str) -> Dict[str, np.ndarray]:
  """All arrays of an .npz file, eagerly, so a damaged archive fails here with its name."""
  if os.path.isfile(path):
    with open(path, "rb") as f:
      head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):  # zip (empty zip) signature
      raise CheckpointError(
          f"{path}: not a readable .npz archive (starts with {head!r}); the file may be an error "
          "page saved by a failed download, or another format renamed to .npz")
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise CheckpointError(
        f"{path}: not a readable .npz archive ({type(e).__name__}: {e}); the file may be "
        "truncated (an interrupted download?) or not a checkpoint") from e
  if not arrays:
    raise CheckpointError(f"{path}: the archive holds no arrays")
  for k, v in arrays.items():
    if not isinstance(v, np.ndarray):   # np.load reads any zip; a PyTorch file holds pickles
      raise CheckpointError(f"{path}: member {k!r} is not an .npy array: not an .npz archive "
                            "(a PyTorch .pth file? see model.family)")
    if v.dtype.kind == "V" and v.dtype.itemsize == 2:  # bfloat16 saved through np.savez.
      arrays[k] = v.view(ml_dtypes.bfloat16)
    elif v.dtype.kind not in "fiub" and v.dtype != ml_dtypes.bfloat16:
      raise CheckpointError(f"{path}: key {k!r} holds dtype {v.dtype}, not numbers")
  return arrays


# ------------------------------------------------------------------------------------------------
# File layout -> canonical (linen, per-block) names, and back for messages.


@dataclasses.dataclass
class _Layout:
  """How the file's keys relate to the canonical names, so every message can use the file's."""

  path: str
  prefix: str = ""
  subtree: str = ""
  pre_linen: bool = False
  posemb_key: str = "pos_embedding"
  inline_map: bool = False
  scan: bool = False

  def file_key(self, canonical: str) -> str:
    key = canonical
    m = _BLOCK_RE.match(key)
    if m:
      layer, rest = m.groups()
      module, _, leaf = rest.partition("/")
      if self.pre_linen:
        module = _LINEN_TO_PRE.get(module, module)
      block = "encoderblock" if self.scan else f"encoderblock_{layer}"
      key = f"Transformer/{block}/{module}/{leaf}" + (f" [layer {layer}]" if self.scan else "")
    elif key == "pos_embedding":
      key = self.posemb_key
    elif self.inline_map and key.startswith("MAPHead_0/"):
      key = key[len("MAPHead_0/"):]
    sub = f"{self.subtree}/" if self.subtree else ""
    return f"{self.prefix}{sub}{key}"

  def where(self, canonical: str) -> str:
    return f"{self.path}: key {self.file_key(canonical)!r}"


def _strip_prefix(flat: Dict[str, np.ndarray], layout: _Layout) -> Dict[str, np.ndarray]:
  for prefix in _PREFIXES:
    if any(k.startswith(prefix) for k in flat):
      layout.prefix = prefix
      return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  return flat


def _top_names(flat: Iterable[str]) -> list:
  return sorted({k.split("/")[0] for k in flat})


def _select_subtree(flat: Dict[str, np.ndarray], subtree: Optional[str],
                    layout: _Layout) -> Dict[str, np.ndarray]:
  if subtree:
    sub = subtree.strip("/") + "/"
    picked = {k[len(sub):]: v for k, v in flat.items() if k.startswith(sub)}
    if not picked:
      raise CheckpointError(
          f"{layout.path}: no sub-tree {subtree!r} (after prefix {layout.prefix!r}); "
          f"available: {', '.join(_top_names(flat))}")
    layout.subtree = subtree.strip("/")
    return picked
  if "embedding/kernel" not in flat:
    towers = [t for t in _top_names(flat) if f"{t}/embedding/kernel" in flat]
    if towers:
      raise CheckpointError(
          f"{layout.path}: this file holds several models ({', '.join(_top_names(flat))}); select "
          f"the image tower with a ':name' suffix, e.g. '{layout.path}:{towers[0]}'")
  return flat


def canonicalize(flat: Mapping[str, np.ndarray], path: str,
                 subtree: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], _Layout]:
  """File keys -> canonical keys (see `vpt_jax.models.vit`); arrays are not modified."""
  layout = _Layout(path=path)
  flat = _select_subtree(_strip_prefix(dict(flat), layout), subtree, layout)
  layout.pre_linen = any(
      re.match(r"^Transformer/encoderblock(_\d+)?/(MultiHeadDotProductAttention_1|LayerNorm_2|"
               r"MlpBlock_3)/", k) for k in flat)
  out: Dict[str, np.ndarray] = {}
  scanned: Dict[str, np.ndarray] = {}
  for key, value in flat.items():
    new = key
    if key in _OLD_POSEMB_KEYS:
      layout.posemb_key, new = key, "pos_embedding"
    elif key.split("/")[0] in _MAP_INLINE and "probe" in flat:
      layout.inline_map, new = True, f"MAPHead_0/{key}"
    m = _BLOCK_RE.match(new) or _SCAN_RE.match(new)
    if m:
      rest = m.groups()[-1]
      module, _, leaf = rest.partition("/")
      if layout.pre_linen:
        module = _PRE_LINEN.get(module, module)
      if _SCAN_RE.match(new):
        scanned[f"{module}/{leaf}"] = value
        continue
      new = f"Transformer/encoderblock_{m.group(1)}/{module}/{leaf}"
    if new in out:
      raise CheckpointError(f"{path}: key {key!r} duplicates another spelling of {new!r}")
    out[new] = value
  if "pos_embedding" not in out and layout.pre_linen:
    layout.posemb_key = _OLD_POSEMB_KEYS[0]  # Name a missing embedding where vit_jax keeps it.
  if scanned:
    layout.scan = True
    depths = {k: v.shape[0] if v.ndim else 0 for k, v in scanned.items()}
    depth = max(depths.values())
    for k, d in depths.items():
      if d != depth:
        raise CheckpointError(
            f"{path}: scan-stacked key {layout.file_key('Transformer/encoderblock_0/' + k)!r} "
            f"has {d} layers on its leading axis where other keys have {depth}")
    for k, v in scanned.items():
      for i in range(depth):
        out[f"Transformer/encoderblock_{i}/{k}"] = v[i]
  return out, layout


# ------------------------------------------------------------------------------------------------
# Architecture.


def _need(flat: Mapping[str, np.ndarray], key: str, layout: _Layout, ndim: int) -> np.ndarray:
  if key not in flat:
    raise CheckpointError(f"{layout.path}: missing key {layout.file_key(key)!r}, needed to infer "
                          f"the architecture (top-level names: {', '.join(_top_names(flat))})")
  v = flat[key]
  if v.ndim != ndim:
    raise CheckpointError(f"{layout.where(key)} has shape {v.shape}; expected {ndim} dimensions")
  return v


def _majority(flat: Mapping[str, np.ndarray], sources: Sequence[Tuple[str, int]]) -> int:
  """The most common size along the given axis of the given keys (ties: the first seen)."""
  sizes = [int(flat[k].shape[axis]) for k, axis in sources
           if k in flat and flat[k].ndim > axis]
  return collections.Counter(sizes).most_common(1)[0][0] if sizes else 0


def _check_finite(flat: Mapping[str, np.ndarray], layout: _Layout) -> None:
  """NaN/Inf weights would load silently and surface as a NaN loss blamed on the lr."""
  for k, v in flat.items():
    if v.dtype.kind == "f" and not np.isfinite(v).all():
      n = int(v.size - np.isfinite(v).sum())
      raise CheckpointError(f"{layout.where(k)} holds {n} NaN/Inf value(s) of {v.size}: the "
                            f"checkpoint is damaged; download or export it again")


def infer_architecture(flat: Mapping[str, np.ndarray], layout: _Layout) -> Architecture:
  """Reads patch size, width, depth, heads, MLP width, pooling, grid, representation and classes."""
  kernel = _need(flat, "embedding/kernel", layout, 4)
  ph, pw, in_channels, width = kernel.shape
  layers = sorted({int(m.group(1)) for k in flat if (m := _BLOCK_RE.match(k))})
  if not layers:
    raise CheckpointError(f"{layout.path}: no encoder blocks (no key under "
                          f"'{layout.file_key('Transformer/encoderblock_0/x').rsplit('/', 2)[0]}')")
  depth = layers[-1] + 1
  missing = sorted(set(range(depth)) - set(layers))
  if missing:
    key = layout.file_key(f"Transformer/encoderblock_{missing[0]}/x")
    raise CheckpointError(f"{layout.path}: encoder block(s) {missing} missing among 0..{depth - 1} "
                          f"(no key under {key!r})")
  q = _need(flat, "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel",
            layout, 3)
  _need(flat, "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel", layout, 2)
  # The MLP width and head count by a majority of every block's keys that carry them, so one
  # damaged array is blamed itself (by `_validate`), not the intact keys around it.
  blocks = [f"Transformer/encoderblock_{i}" for i in range(depth)]
  mlp_dim = _majority(flat, [(f"{b}/MlpBlock_0/Dense_0/kernel", 1) for b in blocks]
                      + [(f"{b}/MlpBlock_0/Dense_0/bias", 0) for b in blocks]
                      + [(f"{b}/MlpBlock_0/Dense_1/kernel", 0) for b in blocks])
  num_heads = _majority(flat, [(f"{b}/MultiHeadDotProductAttention_0/{n}/kernel", 1)
                               for b in blocks for n in ("query", "key", "value")]
                        + [(f"{b}/MultiHeadDotProductAttention_0/out/kernel", 0) for b in blocks])

  class_token = "cls" in flat
  posemb = _need(flat, "pos_embedding", layout, 3)
  rows = posemb.shape[1]
  side = int(round(np.sqrt(rows)))
  if side * side == rows:
    posemb_cls_row = False
  else:
    side = int(round(np.sqrt(rows - 1)))
    if not (class_token and side * side + 1 == rows):
      raise CheckpointError(
          f"{layout.where('pos_embedding')} has {rows} rows: not a square patch grid"
          + (" plus a class-token row" if class_token else ""))
    posemb_cls_row = True

  if "MAPHead_0/probe" in flat:
    pool_type = "map"
    map_q = _need(flat, "MAPHead_0/MultiHeadDotProductAttention_0/query/kernel", layout, 3)
    map_mlp = _need(flat, "MAPHead_0/MlpBlock_0/Dense_0/kernel", layout, 2)
    map_heads, map_mlp_dim = int(map_q.shape[1]), int(map_mlp.shape[1])
  else:
    pool_type = "token" if class_token else "gap"
    map_heads = map_mlp_dim = None

  rep = flat.get("pre_logits/kernel")
  head = flat.get("head/kernel")
  return Architecture(
      patch_size=(int(ph), int(pw)), in_channels=int(in_channels), width=int(width),
      depth=depth, num_heads=num_heads or int(q.shape[1]), mlp_dim=mlp_dim, grid=(side, side),
      pool_type=pool_type, class_token=class_token, posemb_cls_row=posemb_cls_row,
      representation_size=None if rep is None else int(rep.shape[-1]),
      num_classes=None if head is None else int(head.shape[-1]),
      map_num_heads=map_heads, map_mlp_dim=map_mlp_dim)


def expected_shapes(model: VisionTransformer) -> Dict[str, Tuple[int, ...]]:
  """Canonical key -> shape of every parameter the model declares (no compute, no memory)."""
  images = jax.ShapeDtypeStruct((1, *model.image_size, model.in_channels), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)["params"]
  return {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _validate(flat: Mapping[str, np.ndarray], arch: Architecture, layout: _Layout) -> None:
  expected = expected_shapes(arch.model())
  missing = sorted(set(expected) - set(flat))
  if missing:
    raise CheckpointError(
        f"{layout.path}: missing key(s) "
        + ", ".join(f"{layout.file_key(k)!r} {expected[k]}" for k in missing[:5])
        + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        + f"; the keys present describe a ViT with {_describe(arch)}")
  extra = sorted(set(flat) - set(expected))
  if extra:
    raise CheckpointError(
        f"{layout.path}: unexpected key(s) "
        + ", ".join(repr(layout.file_key(k)) for k in extra[:5])
        + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        + f" for a ViT with {_describe(arch)}; this file may hold more than a ViT image model")
  for k, shape in expected.items():
    if tuple(flat[k].shape) != shape:
      raise CheckpointError(
          f"{layout.where(k)} has shape {tuple(flat[k].shape)} but a ViT with {_describe(arch)} "
          f"(inferred from the rest of the file) needs {shape}")


def _describe(arch: Architecture) -> str:
  return (f"patch {arch.patch_size}, width {arch.width}, depth {arch.depth}, "
          f"{arch.num_heads} heads, MLP {arch.mlp_dim}, pool '{arch.pool_type}'")


# ------------------------------------------------------------------------------------------------
# Position embeddings at another resolution.


def _interp_matrix(n_old: int, n_new: int) -> np.ndarray:
  """(n_new, n_old) linear interpolation weights with aligned corners (scipy.ndimage.zoom order 1).

  Output index j samples input position j * (n_old - 1) / (n_new - 1), so both ends are kept.
  """
  m = np.zeros((n_new, n_old), np.float64)
  if n_new == 1 or n_old == 1:
    m[:, 0] = 1.0
    return m
  pos = np.arange(n_new) * (n_old - 1) / (n_new - 1)
  lo = np.clip(np.floor(pos).astype(int), 0, n_old - 2)
  frac = pos - lo
  m[np.arange(n_new), lo] = 1.0 - frac
  m[np.arange(n_new), lo + 1] += frac
  return m


def resample_posemb(posemb: np.ndarray, old_grid: Sequence[int], new_grid: Sequence[int], *,
                    cls_row: bool) -> np.ndarray:
  """Bilinear (aligned-corner) resize of the grid rows of a (1, [1 +] gh*gw, D) embedding.

  Matches vit_jax's `interpolate_posembed` and big_vision's `resample_posemb` (both zoom the
  gh x gw x D grid with spline order 1); a class-token row is kept aside unchanged.
  """
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  head, grid = (posemb[:, :1], posemb[:, 1:]) if cls_row else (posemb[:, :0], posemb)
  if old_grid == new_grid:
    return posemb
  d = grid.shape[-1]
  g = grid.reshape(old_grid[0], old_grid[1], d).astype(np.float64)
  g = np.einsum("ih,jw,hwd->ijd", _interp_matrix(old_grid[0], new_grid[0]),
                _interp_matrix(old_grid[1], new_grid[1]), g)
  g = g.reshape(1, new_grid[0] * new_grid[1], d).astype(posemb.dtype)
  return np.concatenate([head, g], axis=1)


# ------------------------------------------------------------------------------------------------
# The entry point.


def inspect(spec: str, cache_dir: Optional[str] = None) -> Architecture:
  """The architecture of a checkpoint (zoo name, URL or path with optional ':subtree')."""
  path, subtree = resolve(spec, cache_dir)
  flat, layout = canonicalize(read_npz(path), path, subtree)
  return infer_architecture(flat, layout)


def load_pretrained(spec: str, *, image_size: Optional[int | Sequence[int]] = None,
                    num_classes: Optional[int] = None, drop_pre_logits: bool = False,
                    dtype: Any = jnp.float32, cache_dir: Optional[str] = None,
                    ) -> Tuple[VisionTransformer, Dict[str, Params]]:
  """Loads an original ViT checkpoint as `(model, variables)`.

  `model.apply(variables, images)` maps NHWC float32 images in [-1, 1] to logits (inference mode;
  pass `train=True` for dropout).

  Args:
    spec: local .npz path, gs:// or https:// URL (downloaded once into `cache_dir`), or a name
      from `vpt_jax.weights.zoo`; a ':name' suffix selects a sub-tree (SigLIP: 'file.npz:img').
    image_size: int or (height, width) to run at; the position embedding is resampled to the new
      patch grid. Default: the checkpoint's own resolution.
    num_classes: replace the head by a fresh zero-initialised one with this many classes (the
      transfer case). Default: keep the checkpoint's head.
    drop_pre_logits: remove the tanh representation layer (as vit_jax does for fine-tuning, and
      as VPT does); needs `num_classes`, since the old head reads the representation.
    dtype: compute dtype of the matmuls (e.g. jnp.bfloat16); parameters stay float32.
    cache_dir: download cache (default $VPT_JAX_CACHE or ~/.cache/vpt_jax).
  """
  path, subtree = resolve(spec, cache_dir)
  flat, layout = canonicalize(read_npz(path), path, subtree)
  arch = infer_architecture(flat, layout)
  _validate(flat, arch, layout)
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}

  overrides: Dict[str, Any] = {"dtype": dtype}
  if image_size is not None:
    size = as_pair(image_size)
    if size[0] % arch.patch_size[0] or size[1] % arch.patch_size[1]:
      raise ValueError(f"image_size {size} is not a multiple of the patch size "
                       f"{arch.patch_size} of {path}")
    new_grid = (size[0] // arch.patch_size[0], size[1] // arch.patch_size[1])
    flat["pos_embedding"] = resample_posemb(flat["pos_embedding"], arch.grid, new_grid,
                                            cls_row=arch.posemb_cls_row)
    overrides["image_size"] = size
  if drop_pre_logits:
    if num_classes is None:
      raise ValueError("drop_pre_logits=True replaces the head input, so it needs num_classes")
    flat.pop("pre_logits/kernel", None)
    flat.pop("pre_logits/bias", None)
    overrides["representation_size"] = None
  if num_classes is not None:
    if num_classes < 1:
      raise ValueError(f"num_classes must be positive, got {num_classes}")
    features = overrides.get("representation_size", arch.representation_size) or arch.width
    flat["head/kernel"] = np.zeros((features, num_classes), np.float32)
    flat["head/bias"] = np.zeros((num_classes,), np.float32)
    overrides["num_classes"] = num_classes
  _check_finite(flat, layout)
  model = arch.model(**overrides)
  # device_put, not jnp.asarray: jnp.asarray compiles a copy program for each new array shape
  # (~10 ms each on CPU), which is most of the time of loading a small checkpoint.
  params = traverse_util.unflatten_dict({tuple(k.split("/")): jax.device_put(v)
                                         for k, v in flat.items()})
  return model, {"params": params}


# ------------------------------------------------------------------------------------------------
# Writing: the inverse of the layouts above.


def save_npz(params: Params, path: str, *, layout: str = "vit_jax") -> None:
  """Writes a `VisionTransformer` parameter tree as the published files are laid out.

  layout 'vit_jax': flat '/'-joined keys, pre-Linen module names in the blocks
  (`MultiHeadDotProductAttention_1`, `LayerNorm_2`, `MlpBlock_3`) and the position embedding, with
  its class-token row, at `Transformer/posembed_input/pos_embedding`; only for models with that row
  (`posemb_cls_row=True`). layout 'big_vision': the linen names as they are. The file is written
  under a temporary name and renamed, so a crash never leaves a half-written checkpoint.
  """
  if layout not in ("vit_jax", "big_vision"):
    raise ValueError(f"layout={layout!r}: 'vit_jax' or 'big_vision'")
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
  if layout == "vit_jax":
    rows = flat["pos_embedding"].shape[1] if "pos_embedding" in flat else 0
    side = int(round(np.sqrt(max(rows - 1, 0))))
    if "cls" not in flat or side * side + 1 != rows:
      raise ValueError("the vit_jax layout stores the class-token row in the position embedding; "
                       "this model has none (use layout='big_vision')")
    if any(k.startswith("MAPHead_0/") for k in flat):
      raise ValueError("vit_jax files have no MAP head (use layout='big_vision')")
    renamed = {}
    for k, v in flat.items():
      m = _BLOCK_RE.match(k)
      if m:
        module, _, leaf = m.group(2).partition("/")
        k = f"Transformer/encoderblock_{m.group(1)}/{_LINEN_TO_PRE.get(module, module)}/{leaf}"
      elif k == "pos_embedding":
        k = _OLD_POSEMB_KEYS[0]
      renamed[k] = v
    flat = renamed
  utils.atomic_savez(path, flat)
