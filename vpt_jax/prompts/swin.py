"""VPT (Jia et al. 2022) and E2VPT (Han et al. 2023) prompts on a Swin Transformer, as hooks.

The prompt variables live in the 'prompts' collection (path `prompts/hooks/...`), separate from
the frozen 'params'. `attach(model, ...)` returns the Swin with the prompts plugged in.

What the official code (KMnP/vpt `PromptedSwinTransformer`, ChengHan111/E2VPT
`PromptedSwinTransformer_Prompt_VK`) computes, and so what this does:

* P prompt tokens enter before stage 0, block 0, after the patch-embedding LayerNorm.
* Inside each block they are normalised with the block's LayerNorms, copied into every window of
  their image (zero relative-position bias and zero shift mask for every pair with a prompt), and
  their outputs are averaged over those windows.
* At each patch merging they are tiled 4x along the channels and merged with the same LayerNorm
  and reduction as the patch tokens.
* VPT-deep: before every block except stage 0 block 0 the prompt rows of the residual stream are
  replaced: stage 0 block j >= 1 by `deep_prompt_embeddings_0[j - 1]`, stage s >= 1 block j by
  `deep_prompt_embeddings_s[j]` (the merged prompts are discarded).
* The head reads the mean over all final-normed tokens, prompts included (pool='all').
* E2VPT: key/value prompts (heads, T, head_dim) in every block, put in front of the keys and of the
  values after the qkv projection (one tensor for both); a token mask (P,) and a piece mask
  (P, K), tiled over the channels (channel c uses piece c % K), scale the stage-0 prompts only.
  Unlike the ViT's 0/1 pruning masks ('prompt_masks', frozen), the official Swin masks are
  trainable real values, so here they are 'prompts' variables.

Where the official code is wrong, this does the right thing: it pairs window row r with the prompts
of batch entry r % B (so images in a batch change each other's outputs in VPT-shallow); here each
image's windows get that image's prompts. `batch_order_quirk=True` reproduces the official pairing
for comparisons only.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.models.swin import SwinHooks, SwinTransformer

Array = jax.Array
POOLS = ("all", "image")


def _uniform(bound: float) -> Callable:
  return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class SwinPrompts(SwinHooks):
  """Prompt provider for `SwinTransformer`; build it with `attach`."""

  length: int                      # P, visual prompt tokens
  deep: bool
  dims: Tuple[int, ...]            # stage widths
  depths: Tuple[int, ...]
  num_heads: Tuple[int, ...]
  patch_size: int
  in_channels: int = 3
  kv_length: int = 0               # T, E2VPT key/value prompts per block (0 = none)
  masks: bool = False              # E2VPT token and piece masks on the stage-0 prompts
  pieces: int = 16                 # K
  pool: str = "all"
  dropout: float = 0.0
  quirk: bool = False

  def setup(self):
    p, dims = self.length, self.dims
    rng = lambda: self.make_rng("params")
    var = lambda name, shape, init: self.variable("prompts", name, lambda: init(rng(), shape))
    # VPT's init: U(-v, v), v = sqrt(6 / (3 * patch^2 + width)) (the stage's width for deep ones).
    bound = lambda d: math.sqrt(6.0 / (self.in_channels * self.patch_size ** 2 + d))
    self.prompt_embeddings = var("prompt_embeddings", (1, p, dims[0]), _uniform(bound(dims[0])))
    if self.deep:
      self.deep_prompts = [
          var(f"deep_prompt_embeddings_{s}", (depth - (s == 0), p, d), _uniform(bound(d)))
          for s, (depth, d) in enumerate(zip(self.depths, dims))]
    if self.masks:
      ones = lambda k, shape: jnp.ones(shape, jnp.float32)
      self.token_mask = var("token_mask", (p,), ones)
      self.piece_mask = var("piece_mask", (p, self.pieces), ones)
    if self.kv_length:
      kv = {}
      for s, (depth, d, h) in enumerate(zip(self.depths, dims, self.num_heads)):
        b = math.sqrt(6.0 / (self.kv_length * (d // h)))  # Kaiming-uniform over T * head_dim
        for j in range(depth):
          kv[f"{s}_{j}"] = var(f"kv_{s}_{j}", (h, self.kv_length, d // h), _uniform(b))
      self.kv = kv
    self.drop = nn.Dropout(self.dropout)

  def batch_order_quirk(self) -> bool:
    return self.quirk

  def _batch(self, t: Array, batch: int, train: bool) -> Array:
    t = jnp.broadcast_to(t, (batch,) + t.shape)
    return self.drop(t, deterministic=not train)

  def first_prompts(self) -> Array:
    """The (P, C0) prompts entering stage 0, block 0 (E2VPT masks applied)."""
    t = self.prompt_embeddings.value[0]
    if self.masks:
      pieces = jnp.tile(self.piece_mask.value, (1, self.dims[0] // self.pieces))
      t = t * pieces * self.token_mask.value[:, None]
    return t

  def before_block(self, stage, block, prompts, *, batch, train):
    if stage == 0 and block == 0:
      return self._batch(self.first_prompts(), batch, train)
    if not self.deep:
      return prompts
    table = self.deep_prompts[stage].value
    return self._batch(table[block - 1 if stage == 0 else block], batch, train)

  def prompt_outputs_read(self, stage, block):
    last_stage = stage == len(self.depths) - 1
    if last_stage and block == self.depths[stage] - 1:
      return self.pool == "all"
    return not self.deep  # deep: the next block (or the next stage's block 0) replaces them

  def extra_kv(self, stage, block, *, train):
    if not self.kv_length:
      return None
    t = self.kv[f"{stage}_{block}"].value
    return t, t

  def pool_tokens(self, x, prompts):
    if self.pool == "image" or prompts is None:
      return x
    return jnp.concatenate([prompts, x], axis=1)


def attach(model: SwinTransformer, *, length: int, deep: bool = False, kv_length: int = 0,
           masks: bool = False, pieces: int = 16, pool: str = "all", dropout: float = 0.0,
           batch_order_quirk: bool = False) -> SwinTransformer:
  """`model` with VPT / E2VPT prompts (a clone; the original is unchanged).

  length: P prompt tokens (> 0); deep: VPT-deep; kv_length: E2VPT key/value prompts per block;
  masks/pieces: E2VPT token and piece masks (pieces must divide the stage-0 width);
  pool: 'all' (official: mean over prompts and patches) or 'image' (patches only).
  """
  if model.hooks is not None:
    raise ValueError("this Swin already has hooks attached")
  if length < 1:
    raise ValueError(f"Swin prompts: length={length} must be >= 1")
  if kv_length < 0:
    raise ValueError(f"Swin prompts: kv_length={kv_length} must be >= 0")
  if pool not in POOLS:
    raise ValueError(f"Swin prompts: pool={pool!r}; expected one of {POOLS}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"Swin prompts: dropout={dropout} must be in [0, 1)")
  if masks and (pieces < 1 or model.embed_dim % pieces):
    raise ValueError(f"Swin prompts: pieces={pieces} must divide the stage-0 width "
                     f"{model.embed_dim}")
  stages = model.stages
  hooks = SwinPrompts(length=length, deep=deep, dims=tuple(s.dim for s in stages),
                      depths=tuple(s.depth for s in stages),
                      num_heads=tuple(s.num_heads for s in stages), patch_size=model.patch_size,
                      in_channels=model.in_channels, kv_length=kv_length, masks=masks,
                      pieces=pieces, pool=pool, dropout=dropout, quirk=batch_order_quirk)
  return model.clone(hooks=hooks)


def init_prompts(model: SwinTransformer, rng: Array) -> dict:
  """Fresh 'prompts' variables of a model made by `attach` (the backbone is never computed)."""
  images = jnp.zeros((1, *model.image_size, model.in_channels), jnp.float32)
  return jax.jit(lambda r: model.init(r, images).get("prompts", {}))(rng)


def from_official(arrays: Mapping[str, np.ndarray], model: SwinTransformer, *,
                  source: str = "arrays") -> Tuple[dict, Optional[dict]]:
  """('prompts' collection, head params or None) from official VPT/E2VPT Swin parameter names.

  Accepts `enc.`-prefixed (the `Swin` wrapper) or bare names: prompt_embeddings,
  deep_prompt_embeddings_{s}, prompt_soft_tokens_mask_cls_token, prompt_soft_tokens_pieces_mask_
  cls_token, layers.{i}.blocks.{j}.attn.deep_QKV_embeddings; head.last_layer.{weight,bias}
  (a torch Linear: kernel = weight.T). Shapes are checked against `model`'s prompts.
  """
  names = {"prompt_embeddings": "prompt_embeddings",
           "prompt_soft_tokens_mask_cls_token": "token_mask",
           "prompt_soft_tokens_pieces_mask_cls_token": "piece_mask"}
  want = jax.eval_shape(lambda: init_prompts(model, jax.random.key(0)))["hooks"]
  prompts: Dict[str, np.ndarray] = {}
  head = {}
  for key, value in arrays.items():
    name = key[4:] if key.startswith("enc.") else key
    value = np.asarray(value, np.float32)
    if name.startswith("head.last_layer."):
      leaf = name.rsplit(".", 1)[1]
      head["kernel" if leaf == "weight" else "bias"] = value.T if leaf == "weight" else value
      continue
    if name.startswith("deep_prompt_embeddings_"):
      ours = name
    elif name.endswith(".attn.deep_QKV_embeddings"):
      parts = name.split(".")
      ours = f"kv_{parts[1]}_{parts[3]}"
    else:
      ours = names.get(name)
    if ours is None or ours not in want:
      raise ValueError(f"{source}: key {key!r} is not a prompt of this model (it has "
                       f"{sorted(want)})")
    if tuple(want[ours].shape) != value.shape:
      raise ValueError(f"{source}: key {key!r} has shape {value.shape}; this model needs "
                       f"{tuple(want[ours].shape)}")
    prompts[ours] = value
  missing = sorted(set(want) - set(prompts))
  if missing:
    raise ValueError(f"{source}: no value for prompt(s) {missing}")
  return {"hooks": prompts}, (head or None)
