"""The hook interface: how prompts and other additions reach into a frozen backbone.

A backbone family (the ViTs; Swin and the ConvNets below) calls an optional `Hooks` module at five
points, and nothing else of the backbone changes when a method is added. Each method exists
because some method of the papers needs to act at exactly that point:

* `embed(images, embedding)` -- the input side. Pixel-space prompts (a learnable border, extra
  channels, pixel patches) change the images before the frozen stem, or add tokens after it
  (without position embedding). It is the only point a ConvNet offers to prompts (VPT's
  "prompts as learnable pixel padding"), so every family has it.
* `layer(layer, x)` -> `LayerInput` -- per layer, one call that says everything the layer sees:
  the token sequence it computes (prompts inserted, replaced or dropped), `memory` tokens it only
  attends to (they pass its frozen LayerNorm and key/value projections, no query, residual or MLP:
  the exact fast path for VPT-deep prompts whose outputs the next layer discards), extra keys and
  values in head space (E2VPT key-value prompts), and a key mask (pruned prompts). `num_prompts`
  says how many of `tokens` are prompts, right after the backbone's own prefix (class token), so
  a family that treats prompts apart from its grid (Swin: broadcast into every window, merged
  separately at patch merging) never counts them by subtracting lengths.
* `mlp_output(layer, y)` -- the feed-forward output before the residual add (adapters).
* `after_encoder(x)` -- which tokens the backbone's pooling reads (prompt outputs or not).
* `head_input(x, images)` -- the pooled features the head reads (MLP-k heads, side networks,
  which also see the images; `images` is None when the model was entered at a later layer).

Other families use the points that exist in them and add what their geometry needs (each says
why in its own docstring):

* Swin (`models.swin.SwinHooks`): prompts live in every window of their image, have no relative
  position, change width at each patch merging and may be replaced before any block of any
  stage, so the points are per (stage, block): `before_block`, `extra_kv`, `merge_prompts`,
  `pool_tokens`. There is no single token sequence to hand to `layer`, hence no `LayerInput`.
* ConvNets (`models.convnets`): only the input side exists (VPT's "prompts as learnable pixel
  padding"), i.e. the `embed` point; their pad prompt enlarges the image instead of resizing it,
  so it is a module of the ConvNet (`pad_tokens`) rather than a ViT `embed` hook, which must keep
  the ViT's patch grid.

`ComposedHooks` chains several hook modules while each keeps its variable paths, so a
checkpoint's leaf names never depend on what else is attached. Hook modules declare their
variables in `setup()` (a module may have only one compact method, and hooks have several).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
KeyValue = Tuple[Array, Array]


class LayerInput(NamedTuple):
  """What one encoder layer sees (see the module docstring).

  tokens: (batch, n, D), the sequence the layer computes; row 0 stays the class token when the
    backbone has one ('token' pooling and the fast path read it).
  num_prompts: how many rows of `tokens` after the backbone's prefix are prompts.
  memory: (m, D) shared by the batch or (batch, m, D): key/value-only tokens, or None.
  extra_kv: (keys, values) in head space, each (e, heads, head_dim) or (batch, e, heads,
    head_dim), or None.
  key_mask: bool (n + m,) over [tokens; memory]: False keys get no attention weight (pruned
    prompts), or None = all. Pruning stays a mask over variables, not static indices, because the
    masks are the variables that importance scoring differentiates.
  """

  tokens: Array
  num_prompts: int = 0
  memory: Optional[Array] = None
  extra_kv: Optional[KeyValue] = None
  key_mask: Optional[Array] = None


class Hooks(nn.Module):
  """Identity hooks; subclass and override to change what the backbone sees."""

  def embed(self, images: Array, embedding: Callable[[Array], Array], *,
            train: bool) -> Tuple[Array, Optional[Array]]:
    """(patch tokens (B, gh, gw, D), tokens to insert after the class token or None).

    `embedding` is the model's (frozen) stem; it accepts any image size.
    """
    del train
    return embedding(images), None

  def layer(self, layer: int, x: Array, *, num_prompts: int, train: bool) -> LayerInput:
    """What layer `layer` (0-based) sees, given the sequence `x` the previous layer produced,
    of which `num_prompts` rows (after the prefix) are prompts."""
    del layer, train
    return LayerInput(x, num_prompts)

  def mlp_output(self, layer: int, y: Array, *, train: bool) -> Array:
    """The MLP output of layer `layer` before it is added to the residual stream (adapters)."""
    del layer, train
    return y

  def after_encoder(self, x: Array, *, num_prompts: int, train: bool) -> Array:
    """The tokens (after the final LayerNorm) that the model's pooling reads."""
    del num_prompts, train
    return x

  def head_input(self, x: Array, images: Optional[Array], *, train: bool) -> Array:
    """The features the head reads (after pooling and pre_logits): MLP heads, side networks."""
    del images, train
    return x


# The name the package exported before the interface was cut down (vpt_jax.EncoderHooks).
EncoderHooks = Hooks


def _broadcast_kv(t: Array, batch: int) -> Array:
  return jnp.broadcast_to(t, (batch,) + t.shape[-3:])


class ComposedHooks(Hooks):
  """Several hook modules applied in order; each keeps its own variable paths (`hooks/...`).

  layer, mlp_output, after_encoder and head_input chain (part 0 first): each part's `layer` sees
  the previous part's tokens, and the prompt counts add up; memory tokens, extra keys/values and
  key masks of different parts are combined (memory: at most one part). `embed` passes each part
  the next part's embedding, so image-space changes compose and inserted tokens concatenate.
  """

  parts: Tuple[Hooks, ...]

  def setup(self):
    for p in self.parts:
      nn.share_scope(self, p)

  def embed(self, images, embedding, *, train):
    inserted = []

    def through(i: int, ims: Array) -> Array:
      if i == len(self.parts):
        return embedding(ims)
      tokens, extra = self.parts[i].embed(ims, functools.partial(through, i + 1), train=train)
      if extra is not None:
        inserted.append(extra)
      return tokens
    tokens = through(0, images)
    if not inserted:
      return tokens, None
    b = images.shape[0]
    return tokens, jnp.concatenate(
        [jnp.broadcast_to(t, (b,) + t.shape[-2:]) for t in reversed(inserted)], axis=1)

  def layer(self, layer, x, *, num_prompts, train):
    out = LayerInput(x, num_prompts)
    kvs, masks, memory = [], [], None
    for p in self.parts:
      step = p.layer(layer, out.tokens, num_prompts=out.num_prompts, train=train)
      if step.memory is not None:
        if memory is not None:
          raise NotImplementedError(f"two composed hook modules give memory tokens for layer "
                                    f"{layer}; at most one may")
        memory = step.memory
      if step.extra_kv is not None:
        kvs.append(step.extra_kv)
      if step.key_mask is not None:
        masks.append(step.key_mask)
      out = step
    if len(kvs) > 1:
      b = x.shape[0]
      kvs = [tuple(jnp.concatenate([_broadcast_kv(kv[j], b) for kv in kvs], axis=1)
                   for j in (0, 1))]
    return LayerInput(out.tokens, out.num_prompts, memory, kvs[0] if kvs else None,
                      functools.reduce(jnp.logical_and, masks) if masks else None)

  def mlp_output(self, layer, y, *, train):
    for p in self.parts:
      y = p.mlp_output(layer, y, train=train)
    return y

  def after_encoder(self, x, *, num_prompts, train):
    for p in self.parts:
      x = p.after_encoder(x, num_prompts=num_prompts, train=train)
    return x

  def head_input(self, x, images, *, train):
    for p in self.parts:
      x = p.head_input(x, images, train=train)
    return x


def hook_parts(hooks: Optional[Hooks]) -> Sequence[Hooks]:
  """The hook modules of `hooks` (a model's `hooks` field), composed or not."""
  if hooks is None:
    return ()
  return tuple(hooks.parts) if isinstance(hooks, ComposedHooks) else (hooks,)
