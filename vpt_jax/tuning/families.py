"""The trainer on the backbones that are not ViTs: Swin, ConvNeXt and ResNet.

`vpt_jax.tuning.build` hands a run to this module once the file's family is known. Everything
else of a run (pipelines, steps, checkpoints, the report) is shared with the ViTs, because the
three models expose what that code reads: `depth` (blocks), `width` (the head's input),
`image_size` (what the input pipeline makes) and a `params/head` Dense.

What differs, and why:

* Prompts. Swin takes VPT-shallow/deep and E2VPT key-value prompts inside its windows
  (`vpt_jax.prompts.swin`, the official Swin code's scheme); the ConvNets have no token sequence,
  so their one prompt is VPT's learnable pixel border (`prompt.location='pad'`, `prompt.length`
  pixels wide, around the `model.image_size` image: the input grows by 2 * length).
* Protocols. linear, partial-k, bias, full, vpt and vpt+bias apply to every family. partial-k
  trains the last k blocks in execution order and every parameter after the first of them (a
  patch merging / downsampling layer between two trained blocks trains too), the final norm
  and the head. mlp-k, adapter and side attach modules to ViT layers: refused.
  ResNet's BatchNorm statistics never train (frozen BatchNorm, as in the official code).
* Options of the ViT prompt code without a counterpart here are refused by `check_config`, each
  with the option and the family in the message (README "Status" lists them).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from vpt_jax import utils
from vpt_jax.models.convnets import ConvNeXt, ResNet
from vpt_jax.models.swin import SwinTransformer
from vpt_jax.prompts import swin as swin_prompts
from vpt_jax.prompts import vpt as vpt_prompts
from vpt_jax.tuning import rules
from vpt_jax.weights import zoo

FAMILIES = ("swin", "convnext", "resnet")
CONVNETS = ("convnext", "resnet")
# Protocols whose modules hook into ViT encoder layers (`vpt_jax.models.heads`).
_VIT_ONLY_PROTOCOLS = re.compile(r"mlp-\d+|adapter|side")
_HEAD = r"params/head/.*"


def family_of(model: Any) -> str:
  """'swin', 'convnext', 'resnet', or '' for a ViT."""
  if isinstance(model, SwinTransformer):
    return "swin"
  if isinstance(model, ConvNeXt):
    return "convnext"
  if isinstance(model, ResNet):
    return "resnet"
  return ""


def known_family(mcfg: ml_collections.ConfigDict) -> str:
  """The family a config names without reading its file (model.family or the zoo entry)."""
  family = mcfg.get("family", "auto")
  return zoo.family_of(mcfg.checkpoint) if family == "auto" else family


def _refuse(option: str, value: Any, family: str, why: str) -> None:
  raise ValueError(f"config {option}={value!r} does not apply to a {family} backbone: {why}")


def check_config(config: ml_collections.ConfigDict, family: str) -> None:
  """Refuses every option that has no meaning on `family` (one of FAMILIES), naming it."""
  m, p = config.model, config.prompt
  utils.check_options(p, vpt_prompts.default_config(), "prompt")
  if _VIT_ONLY_PROTOCOLS.fullmatch(config.protocol):
    _refuse("protocol", config.protocol, family, "its modules hook into ViT encoder layers; use "
            "linear, partial-k, bias, full, vpt or vpt+bias")
  if m.image_size <= 0:
    _refuse("model.image_size", m.image_size, family,
            "its file does not store the input size; set it (224 for the published files)")
  if p.length < 0 or p.kv_length < 0:
    raise ValueError(f"config prompt.length={p.length} / prompt.kv_length={p.kv_length} must be "
                     ">= 0")
  if not 0.0 <= p.dropout < 1.0:
    raise ValueError(f"config prompt.dropout={p.dropout} must be in [0, 1)")
  # Options of the ViT prompt code with no counterpart on these families (default = allowed).
  for key, ok in (("depth", 0), ("reverse", False), ("shared", False), ("expand", True),
                  ("project", 0), ("masks", False), ("mask_file", ""), ("kv_shared", True),
                  ("kv_deep", True), ("init", "uniform")):
    if p[key] != ok:
      _refuse(f"prompt.{key}", p[key], family,
              "an option of the ViT prompt code only (README, 'PyTorch backbones')")
  if family in CONVNETS:
    _check_convnet(config, family)
  else:
    _check_swin(config)
  if config.protocol in ("vpt", "vpt+bias") and not (p.length or p.kv_length):
    _refuse("protocol", config.protocol, family, "it trains prompts, and prompt.length=0")


def _check_convnet(config: ml_collections.ConfigDict, family: str) -> None:
  m, p = config.model, config.prompt
  if m.dtype != "float32":
    _refuse("model.dtype", m.dtype, family, "the ConvNets compute in float32 only")
  if p.kv_length:
    _refuse("prompt.kv_length", p.kv_length, family, "a ConvNet has no attention (E2VPT "
            "key-value prompts need one)")
  if p.length and p.location != "pad":
    _refuse("prompt.location", p.location, family, "a ConvNet has no token sequence; VPT prompts "
            "it with prompt.location='pad' (a learnable border of prompt.length pixels)")
  if p.length and p.deep:
    _refuse("prompt.deep", True, family, "the pad prompt is an input prompt; set prompt.deep=False")
  if p.pool != "original":
    _refuse("prompt.pool", p.pool, family, "a ConvNet pools its feature map ('original')")
  if p.dropout:
    _refuse("prompt.dropout", p.dropout, family, "the official pad prompt has no dropout")


def _check_swin(config: ml_collections.ConfigDict) -> None:
  p = config.prompt
  if (p.length or p.kv_length) and p.location != "prepend":
    _refuse("prompt.location", p.location, "swin", "Swin prompts are tokens inside every window "
            "('prepend')")
  if p.kv_length and not p.length:
    _refuse("prompt.kv_length", p.kv_length, "swin", "E2VPT on Swin pairs key-value prompts with "
            "visual prompts; set prompt.length > 0")
  if p.pool not in ("original", "image", "all"):
    _refuse("prompt.pool", p.pool, "swin", "its head reads the mean over the patch tokens "
            "('original' = 'image') or over prompts and patches ('all', the official code)")


def attach_prompts(config: ml_collections.ConfigDict, family: str, model: Any,
                   variables: Dict[str, Any], rng: jax.Array) -> Tuple[Any, Dict[str, Any]]:
  """The model with the config's prompts and their fresh values (none: unchanged)."""
  p = config.prompt
  if not (p.length or p.kv_length):
    return model, variables
  if family == "swin":
    model = swin_prompts.attach(model, length=p.length, deep=p.deep, kv_length=p.kv_length,
                                pool="all" if p.pool == "all" else "image", dropout=p.dropout)
    return model, {**variables, "prompts": swin_prompts.init_prompts(model, rng)}
  size = model.image_size
  model = model.clone(pad_tokens=p.length, pad_init="random")
  images = jnp.zeros((1, *size, 3), jnp.float32)
  init = jax.jit(lambda r: model.init(r, images)["prompts"])(rng)
  return model, {**variables, "prompts": init}


def _units(model: Any) -> List[Tuple[str, bool]]:
  """(parameter module path, is a block) in execution order, head excluded."""
  family = family_of(model)
  if family == "swin":
    out = [("patch_embed", False)]
    n = len(model.depths)
    for i, d in enumerate(model.depths):
      out += [(f"layers_{i}/blocks_{j}", True) for j in range(d)]
      if i < n - 1:
        out.append((f"layers_{i}/downsample", False))
    return out + [("norm", False)]
  if family == "convnext":
    out = [("stem_conv", False), ("stem_norm", False)]
    for s, d in enumerate(model.depths):
      if s:
        out += [(f"downsample{s}_norm", False), (f"downsample{s}_conv", False)]
      out += [(f"stage{s + 1}_{j}", True) for j in range(d)]
    return out + [("norm", False)]
  out = [("conv1", False), ("bn1", False)]
  for l, n in enumerate(model.layers):
    out += [(f"layer{l + 1}_{b}", True) for b in range(n)]
  return out


def protocol_patterns(name: str, model: Any) -> List[str]:
  """The trainable-path patterns of a named protocol on a Swin / ConvNeXt / ResNet."""
  family = family_of(model)
  if _VIT_ONLY_PROTOCOLS.fullmatch(name):
    _refuse("protocol", name, family, "its modules hook into ViT encoder layers")
  if name == "full":  # every weight, never ResNet's BatchNorm statistics
    return [r"(params|prompts)/.*"]
  m = re.fullmatch(r"partial-(\d+)", name)
  if m:
    k = int(m.group(1))
    units = _units(model)
    blocks = [i for i, (_, is_block) in enumerate(units) if is_block]
    if not 0 < k <= len(blocks):
      raise ValueError(f"protocol {name!r} needs 1 <= k <= {len(blocks)} (the blocks of this "
                       f"{family})")
    tail = [u for u, _ in units[blocks[-k]:]]
    return [rf"params/({'|'.join(re.escape(u) for u in tail)})/.*", _HEAD]
  return rules.protocol_patterns(name)   # vpt, linear, bias, vpt+bias: family-independent


def model_fingerprint(model: Any) -> Dict[str, Any]:
  """The architecture fields of a Swin / ConvNet (not execution choices), and the family."""
  skip = ("parent", "name", "hooks", "dtype", "fast_path", "pad_tokens", "pad_init")
  return {"family": family_of(model)} | {
      f.name: utils.jsonable(getattr(model, f.name)) for f in dataclasses.fields(model)
      if f.name not in skip}


def prompt_fingerprint(model: Any) -> Optional[Dict[str, Any]]:
  """The prompt options of a Swin / ConvNet (None without prompts)."""
  if family_of(model) == "swin":
    hooks = model.hooks
    if hooks is None:
      return None
    return {f.name: utils.jsonable(getattr(hooks, f.name)) for f in dataclasses.fields(hooks)
            if f.name not in ("parent", "name")}
  if not model.pad_tokens:
    return None
  return {"location": "pad", "length": model.pad_tokens, "init": model.pad_init}
