"""One entry point for every backbone file the trainer tunes: `load_pretrained(spec, family=...)`.

`family` picks the reader: 'vit' (the Google .npz files, `weights.npz`), 'mae' / 'moco' (the
PyTorch ViTs of VPT's Table 4, `weights.torch_vit`), or 'auto': the zoo entry's family, else
'vit' for an .npz file, else the PyTorch file's keys decide (`detect_family`).

`load_pretrained` returns a `VisionTransformer`, so Swin, ConvNeXt and ResNet files are refused
there with an error that says which module loads them; `load_any` loads every family (the
trainer's door: `vpt_jax.tuning.build`, `vpt_jax.tuning.families`).
"""

from __future__ import annotations

import zipfile
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.models.swin import SwinTransformer
from vpt_jax.models.vit import VisionTransformer, as_pair
from vpt_jax.weights import npz, torch_convnets, torch_swin, torch_vit, zoo
from vpt_jax.weights.download import CheckpointError, resolve
from vpt_jax.weights.torch import read_state_dict

FAMILIES = ("auto", "vit", "mae", "moco", "swin", "convnext", "resnet")
TRAINER_FAMILIES = ("vit", "mae", "moco")
_LOADED_BY = {"swin": "vpt_jax.weights.torch_swin.load_pretrained",
              "convnext": "vpt_jax.weights.torch_convnets.convnext_from_torch",
              "resnet": "vpt_jax.weights.torch_convnets.resnet_from_torch"}


def detect_family(state: Mapping[str, np.ndarray], path: str) -> str:
  """The family of a PyTorch state dict, from its key names (MoCo: the linear-eval `head`)."""
  keys = set(state)
  if any(k.endswith("relative_position_bias_table") for k in keys):
    return "swin"
  if any(k.startswith(("stages.", "downsample_layers.")) for k in keys):
    return "convnext"
  if "layer1.0.conv1.weight" in keys:
    return "resnet"
  if "patch_embed.proj.weight" in keys or "base_encoder.patch_embed.proj.weight" in keys:
    # MAE's pre-training files carry no classifier; MoCo v3's linear-eval files (what VPT reads)
    # and pre-training files (`base_encoder.`) do, or are MoCo by their prefix.
    moco = "head.weight" in keys or any(k.startswith("base_encoder.") for k in keys)
    return "moco" if moco else "mae"
  raise CheckpointError(f"{path}: cannot tell the backbone family from its keys (first: "
                        f"{sorted(keys)[:5]}); set model.family to one of {FAMILIES[1:]}")


def default_num_heads(width: int) -> int:
  """Heads of the published PyTorch ViTs (not stored in their files): head width 64."""
  return max(1, width // 64)


def load_pretrained(spec: str, *, family: str = "auto", num_heads: int = 0,
                    image_size: Optional[int | Sequence[int]] = None,
                    num_classes: Optional[int] = None, drop_pre_logits: bool = False,
                    dtype: Any = jnp.float32, cache_dir: Optional[str] = None,
                    head: bool = False) -> Tuple[VisionTransformer, Dict[str, Any]]:
  """(model, variables) of a backbone file of any trainer family (see the module docstring).

  num_heads: for the PyTorch ViTs, whose files do not store it; 0 = width // 64 (ViT-B: 12,
    ViT-L/H: 16). The other arguments as `weights.npz.load_pretrained`; `drop_pre_logits` has no
    effect on the PyTorch ViTs (they have no representation layer).
  head: keep a PyTorch file's own classifier (MoCo v3's linear-evaluation head) as the model's
    head, e.g. to predict with it; VPT drops it. The .npz files keep theirs unless num_classes.
  """
  family, path, state = _read(spec, family, cache_dir)
  if family == "vit":
    return npz.load_pretrained(spec, image_size=image_size, num_classes=num_classes,
                               drop_pre_logits=drop_pre_logits, dtype=dtype, cache_dir=cache_dir)
  if family not in TRAINER_FAMILIES:
    raise CheckpointError(
        f"{path}: a {family} checkpoint; this loader returns ViT-family backbones "
        f"({', '.join(TRAINER_FAMILIES)}) only. Load it with {_LOADED_BY[family]}, or train it "
        "with the trainer (`vpt_jax.tuning.families`; README 'Model zoo').")
  return _vit_from_state(state, family, path, num_heads=num_heads, image_size=image_size,
                         num_classes=num_classes, dtype=dtype, head=head)


def _read(spec: str, family: str, cache_dir: Optional[str]
          ) -> Tuple[str, str, Optional[Mapping[str, np.ndarray]]]:
  """(family, local path, PyTorch state dict or None for an .npz file) of a backbone spec."""
  if family not in FAMILIES:
    raise ValueError(f"model.family={family!r}: expected one of {FAMILIES}")
  if family == "auto":
    family = zoo.family_of(spec) or "auto"
  if family == "vit":  # the .npz reader resolves (and downloads) it itself
    return family, spec, None
  path, subtree = resolve(spec, cache_dir)
  if family == "auto" and (subtree or _is_npz(path)):
    family = "vit"
  if family == "vit":
    return family, path, None
  state = read_state_dict(path)
  found = detect_family(state, path)
  if family != "auto" and found != family and {family, found} != {"mae", "moco"}:
    raise CheckpointError(f"{path}: model.family={family!r}, but the file holds a {found} "
                          "state dict")
  return (family if family != "auto" else found), path, state


def load_any(spec: str, *, family: str = "auto", image_size: Optional[int] = None,
             num_classes: Optional[int] = None, cache_dir: Optional[str] = None, **vit_kwargs
             ) -> Tuple[str, Any, Dict[str, Any]]:
  """(family, model, variables) of a backbone file of any family, the file read once.

  The ViT families go through `load_pretrained` (`vit_kwargs`: num_heads, drop_pre_logits,
  dtype); Swin, ConvNeXt and ResNet through their own converters, with a new zero head of
  `num_classes` (None: no head). image_size: Swin's resolution (its file does not store it;
  required); the ConvNets' input size before any pad prompt (recorded on the model).
  """
  family, path, state = _read(spec, family, cache_dir)
  if family == "vit":
    model, variables = npz.load_pretrained(
        spec, image_size=image_size, num_classes=num_classes, cache_dir=cache_dir,
        drop_pre_logits=vit_kwargs.get("drop_pre_logits", False),
        dtype=vit_kwargs.get("dtype", jnp.float32))
    return family, model, variables
  if family in TRAINER_FAMILIES:
    return family, *_vit_from_state(state, family, path, image_size=image_size,
                                    num_classes=num_classes, **vit_kwargs)
  if not image_size:
    raise ValueError(f"{path}: model.image_size={image_size or 0} does not apply to a {family} "
                     "backbone: its file does not store the input size; set it (224 for the "
                     "published files)")
  size = tuple(as_pair(image_size))
  if family == "swin":
    dtype = vit_kwargs.get("dtype", jnp.float32)
    cfg = torch_swin.config_from_state_dict(state, image_size=size, source=path)
    cfg["num_classes"] = num_classes
    model = SwinTransformer(**cfg)
    params = torch_swin.convert_state_dict(state, model, head=False, source=path)
    variables = {"params": params}
    model = model.clone(dtype=dtype)
  else:
    convert = {"convnext": torch_convnets.convnext_from_torch,
               "resnet": torch_convnets.resnet_from_torch}[family]
    model, variables = convert(state, path=path)
    model = model.clone(num_classes=num_classes, image_size=size)
  if num_classes:
    width = model.width
    variables = {**variables, "params": {
        **variables["params"], "head": {"kernel": np.zeros((width, num_classes), np.float32),
                                        "bias": np.zeros((num_classes,), np.float32)}}}
  return family, model, _as_jnp(variables)


def _vit_from_state(state, family, path, *, num_heads=0, image_size=None, num_classes=None,
                    dtype=jnp.float32, drop_pre_logits=False, head=False):
  del drop_pre_logits  # the PyTorch ViTs have no representation layer
  width = int(state.get("patch_embed.proj.weight",
                        state.get("base_encoder.patch_embed.proj.weight")).shape[0])
  if head and "head.weight" not in state:
    raise CheckpointError(f"{path}: this {family} file has no classifier ('head.weight'; MAE "
                          "pre-training files hold the encoder only)")
  model, params = torch_vit.vit_from_torch(state, family=family, path=path, head=head,
                                           num_heads=num_heads or default_num_heads(width))
  overrides: Dict[str, Any] = {"dtype": dtype}
  if image_size is not None and as_pair(image_size) != tuple(model.image_size):
    size = as_pair(image_size)
    ph, pw = model.patch_size
    if size[0] % ph or size[1] % pw:
      raise ValueError(f"image_size {size} is not a multiple of the patch size "
                       f"{model.patch_size} of {path}")
    params = dict(params, pos_embedding=npz.resample_posemb(
        np.asarray(params["pos_embedding"]), model.grid, (size[0] // ph, size[1] // pw),
        cls_row=True))
    overrides["image_size"] = size
  if num_classes is not None:
    if num_classes < 1:
      raise ValueError(f"num_classes must be positive, got {num_classes}")
    params = dict(params, head={"kernel": np.zeros((model.width, num_classes), np.float32),
                                "bias": np.zeros((num_classes,), np.float32)})
    overrides["num_classes"] = num_classes
  params = _as_jnp(params)
  return model.clone(**overrides), {"params": params}


def is_pytorch(spec: str, cache_dir: Optional[str] = None) -> bool:
  """Whether `spec` names a PyTorch file (fed ImageNet mean/std inputs) rather than a Google .npz
  (inputs in [-1, 1]); a URL is fetched into the cache to tell."""
  family = zoo.family_of(spec)
  if family:
    return family != "vit"
  path, subtree = resolve(spec, cache_dir)
  return not (subtree or _is_npz(path))


def _is_npz(path: str) -> bool:
  """An .npz archive holds .npy members only; a PyTorch zip holds a pickle and raw storages. A
  file named .npz is read as one, so a damaged .npz gets the .npz reader's error."""
  if path.endswith(".npz"):
    return True
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
  return bool(names) and all(n.endswith(".npy") for n in names)


def _as_jnp(tree: Any) -> Any:
  """The tree's host arrays on the default device, as dicts (device_put rather than
  jnp.asarray, which compiles a copy program for every new shape)."""
  if isinstance(tree, Mapping):
    return {k: _as_jnp(v) for k, v in tree.items()}
  return jax.device_put(tree)
