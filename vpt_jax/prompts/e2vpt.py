"""E2VPT's prompt masks (Han et al., ICCV 2023): the 'prompt_masks' variables and their files.

A token mask (p,) and a segment mask (p, R), shared by every prompted layer as in the official
code, in the frozen 'prompt_masks' collection. Prompt token t is multiplied by token_mask[t] and
dimension j of it by segment_mask[t, j % R] (segments strided across the dimensions, as the
official code). A token whose mask is 0 is removed from attention (never a key or value), so a
masked model computes exactly what the compact pruned model computes. Scoring and pruning the
masks is `vpt_jax.tuning.pruning`.
"""

from __future__ import annotations

import hashlib
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpt_jax.models.vit import VisionTransformer

Array = jax.Array
COLLECTION = "prompt_masks"


def apply_masks(tokens: Array, token_mask: Array, segment_mask: Array) -> Array:
  """(..., p, d) prompts times their masks: dimension j of token t by segment_mask[t, j % R]."""
  width, segments = tokens.shape[-1], segment_mask.shape[-1]
  per_dim = jnp.tile(segment_mask, (1, width // segments))
  return tokens * per_dim * token_mask[:, None]


def mask_variables(token_mask: Array, segment_mask: Array) -> dict:
  """The 'prompt_masks' collection holding these masks."""
  return {COLLECTION: {"hooks": {"token_mask": jax.device_put(token_mask),
                                 "segment_mask": jax.device_put(segment_mask)}}}


def masks_of(variables: dict) -> Optional[dict]:
  """{'tokens': (p,), 'segments': (p, R)} numpy masks of `variables`, or None without masks."""
  m = variables.get(COLLECTION)
  if m is None:
    return None
  h = jax.device_get(m["hooks"])
  return {"tokens": np.asarray(h["token_mask"]), "segments": np.asarray(h["segment_mask"])}


def init_masks(model: VisionTransformer) -> dict:
  """The all-ones 'prompt_masks' variables of a model with `prompt.masks`, or {} without."""
  if model.hooks is None or not getattr(model.hooks, "masks", False):
    return {}
  p, r = model.hooks.length, model.hooks.segments
  return mask_variables(jnp.ones((p,), jnp.float32), jnp.ones((p, r), jnp.float32))


def read_masks(cfg: ml_collections.ConfigDict) -> dict:
  """The 0/1 pruning masks of `cfg.mask_file`, checked against the prompt config."""
  try:
    with np.load(cfg.mask_file) as f:
      masks = {k: np.asarray(f[k], np.float32) for k in ("tokens", "segments")}
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"config prompt.mask_file={cfg.mask_file!r}: cannot read a .npz with "
                     f"'tokens' and 'segments' arrays ({e})") from e
  want = {"tokens": (cfg.length,), "segments": (cfg.length, cfg.segments)}
  for k, shape in want.items():
    if masks[k].shape != shape:
      raise ValueError(f"config prompt.mask_file={cfg.mask_file!r}: {k!r} has shape "
                       f"{masks[k].shape}; prompt.length={cfg.length} and prompt.segments="
                       f"{cfg.segments} need {shape}")
    if not np.isin(masks[k], (0.0, 1.0)).all():
      raise ValueError(f"config prompt.mask_file={cfg.mask_file!r}: {k!r} must hold only 0 and 1")
  if not masks["tokens"].any():
    raise ValueError(f"config prompt.mask_file={cfg.mask_file!r} prunes every token")
  return masks


def mask_digest(masks: dict) -> str:
  h = hashlib.sha256()
  for k in ("tokens", "segments"):
    h.update(np.ascontiguousarray(masks[k], np.float32).tobytes())
  return h.hexdigest()


def load_masks(variables: dict, cfg: ml_collections.ConfigDict) -> dict:
  """`variables` with the 'prompt_masks' collection set from `cfg.mask_file` (if any)."""
  if not cfg.mask_file:
    return variables
  masks = read_masks(cfg)
  return {**variables, **mask_variables(masks["tokens"], masks["segments"])}
