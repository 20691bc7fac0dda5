"""A linen Vision Transformer whose parameter tree is the one of the original checkpoints.

Parameter tree (linen names; `vpt_jax.weights.npz` maps both published file layouts onto it):

    embedding/{kernel,bias}          patch-embedding conv, kernel HWIO
    cls                              (1, 1, D), when `class_token`
    pos_embedding                    (1, [1 +] gh*gw, D); the leading class-token row exists
                                     only for vit_jax files (`posemb_cls_row`), big_vision folds
                                     it into cls
    Transformer/encoderblock_{i}/    LayerNorm_0, MultiHeadDotProductAttention_0/{query,key,
                                     value,out}, LayerNorm_1, MlpBlock_0/{Dense_0,Dense_1}
    Transformer/encoder_norm         unless `fc_norm`, which puts `fc_norm` after the pooling
    MAPHead_0/...                    when pool_type == 'map' (big_vision / SigLIP)
    pre_logits/{kernel,bias}         when `representation_size` (Dense + tanh)
    head/{kernel,bias}               when `num_classes`

Prompts and other additions never fork this file: the model calls an optional `Hooks` module
(`vpt_jax.models.hooks`, which says why each of its five methods exists) on the input, once per
layer, on every MLP output and around pooling and the head. `start_layer` enters the model at a
later layer, for cached frozen prefixes. The hooks module is a child of the ViT, so its variables
live in the same variable dict, in whatever collection it chooses (VPT uses 'prompts').

Numerics follow the originals: pre-LN blocks, LayerNorm eps 1e-6, tanh-approximate GELU (flax's
default, which the checkpoints were trained with; `approximate_gelu=False` for PyTorch ViTs),
attention scaled by 1/sqrt(head_dim), softmax in float32. `dtype` sets the compute dtype of the
matmuls/convs only; parameters, LayerNorm statistics, the residual stream, softmax and the logits
stay float32.

`remat` trades compute for memory in the backward pass (exact: the same operations run again):
'block' keeps only each block's inputs and recomputes the block's forward pass in the backward
pass, 'dots' also keeps the outputs of its weight matmuls
(`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`).

Intermediate arrays are sown into the 'intermediates' collection (`stem`, `block_{i}`, `encoded`,
`pooled`, `head_input`, and each attention's weights) so tests and tools can read them with
`mutable=['intermediates']`, at no cost otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax.models.hooks import Hooks, KeyValue, LayerInput

Array = jax.Array
Dtype = Any

LN_EPS = 1e-6
POOL_TYPES = ("token", "gap", "gap_patches", "map")
REMAT = ("none", "block", "dots")


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense, the transformer feed-forward block (GELU: tanh form, or exact erf)."""

  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    d = x.shape[-1]
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    y = nn.gelu(y, approximate=self.approximate_gelu)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    y = nn.Dense(d, dtype=self.dtype, name="Dense_1")(y)
    return y


def attention_weights(q: Array, k: Array, key_mask: Optional[Array] = None) -> Array:
  """softmax(q k^T / sqrt(head_dim)) in float32: (batch, heads, queries, keys).

  q, k: (batch, length, heads, head_dim); key_mask: optional bool (keys,), False keys get zero
  weight.
  """
  q = q / jnp.sqrt(q.shape[-1]).astype(q.dtype)
  # Head-major operands (batch, heads, length, head_dim): the batched dots are then plain
  # (batch * heads) matmuls, faster on XLA:CPU than the (batch, length, heads) einsums
  # (benchmarks/version_ab.py; README, "Where the step's time goes").
  logits = jnp.einsum("bhqd,bhkd->bhqk", _head_major(q), _head_major(k),
                      preferred_element_type=jnp.float32)
  if key_mask is not None:
    logits = jnp.where(key_mask, logits, -jnp.inf)
  return jax.nn.softmax(logits, axis=-1)


def attend(q: Array, k: Array, v: Array, key_mask: Optional[Array] = None) -> Array:
  """softmax(q k^T / sqrt(head_dim)) v over (batch, length, heads, head_dim) arrays."""
  weights = attention_weights(q, k, key_mask).astype(v.dtype)
  return _weighted_values(weights, v)


def _head_major(t: Array) -> Array:
  """(batch, length, heads, head_dim) -> (batch, heads, length, head_dim)."""
  return jnp.swapaxes(t, 1, 2)


def _weighted_values(weights: Array, v: Array) -> Array:
  """weights (batch, heads, queries, keys) . v (batch, keys, heads, head_dim), head-major, as
  (batch, queries, heads, head_dim)."""
  return _head_major(jnp.einsum("bhqk,bhkd->bhqd", weights, _head_major(v)))


def _batched(t: Array, batch: int) -> Array:
  """(n, h, d), (1, n, h, d) or (b, n, h, d) -> (batch, n, h, d)."""
  if t.ndim == 3:
    t = t[None]
  return jnp.broadcast_to(t, (batch,) + t.shape[1:])


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the checkpoints' DenseGeneral layout and optional extra keys/values.

  query/key/value kernels are (D, heads, head_dim), out kernel is (heads, head_dim, D).
  """

  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array, *, memory: Optional[Array] = None,
               extra_kv: Optional[KeyValue] = None, key_mask: Optional[Array] = None) -> Array:
    """Attention of `inputs_q` rows over keys/values [inputs_kv; memory; extra_kv].

    memory: (batch or 1, m, D) tokens that are keys/values only (projected by this layer's
      key/value kernels, never queries); with a leading 1 they are projected once for the batch.
    extra_kv: keys and values already in head space ((e, H, hd) or (batch, e, H, hd)).
    key_mask: optional bool (n + m,) over the inputs_kv and memory rows.

    The weights are sown ('intermediates', 'attention') split by key group -- 'tokens',
    'memory', 'extra' -- so tools read them (class-token attention plots) instead of redoing
    the math, with every group's size explicit.
    """
    d = inputs_q.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}")
    head_dim = d // self.num_heads
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)
    query, key, value = proj("query"), proj("key"), proj("value")
    if self.is_initializing():  # the modules create the checkpoint's parameter tree
      q, k, v = query(inputs_q), key(inputs_kv), value(inputs_kv)
      project_kv = lambda x: (key(x), value(x))
    else:
      params = self.variables["params"]
      project_kv = lambda x: tuple(_project(params, ("key", "value"), x, self.dtype))
      if inputs_q is inputs_kv:
        q, k, v = _project(params, ("query", "key", "value"), inputs_q, self.dtype)
      else:
        (q,), (k, v) = _project(params, ("query",), inputs_q, self.dtype), project_kv(inputs_kv)
    b = inputs_kv.shape[0]
    sizes = {"tokens": k.shape[1]}
    extras = []
    if memory is not None:
      with jax.named_scope("kv_only_prompts"):  # named for benchmarks/step_profile.py
        extras.append(project_kv(memory))
      sizes["memory"] = memory.shape[1]
    if extra_kv is not None:
      extras.append(extra_kv)
      sizes["extra"] = extra_kv[0].shape[-3]
    for ek, ev in extras:
      k = jnp.concatenate([k, _batched(ek, b).astype(k.dtype)], axis=1)
      v = jnp.concatenate([v, _batched(ev, b).astype(v.dtype)], axis=1)
    if key_mask is not None and extra_kv is not None:
      key_mask = jnp.concatenate([key_mask, jnp.ones(sizes["extra"], bool)])
    weights = attention_weights(q, k, key_mask)
    self.sow("intermediates", "attention", _split_keys(weights, sizes))
    y = _weighted_values(weights.astype(v.dtype), v)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out")(y)


def _project(params, names: Sequence[str], x: Array, dtype: Dtype) -> Tuple[Array, ...]:
  """x projected by the DenseGeneral kernels/biases `names` of `params` in one matmul.

  The kernels (D, heads, head_dim) are concatenated per call (cheap next to the matmul), so the
  parameter tree keeps the checkpoint's layout. One (tokens, D) x (D, n * D) matmul reads the
  LayerNorm output once, and its input gradient in the backward is one matmul over n * D instead
  of n matmuls and their sum. Each output element is the same dot product as DenseGeneral's.
  """
  kernels = [params[n]["kernel"] for n in names]
  biases = [params[n]["bias"] for n in names]
  shape = kernels[0].shape[1:]
  kernel = jnp.concatenate([k.reshape(k.shape[0], -1) for k in kernels], axis=1)
  bias = jnp.concatenate([b_.reshape(-1) for b_ in biases])
  x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
  y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))) + bias
  return tuple(part.reshape(x.shape[:-1] + shape) for part in jnp.split(y, len(names), axis=-1))


def _split_keys(weights: Array, sizes: Dict[str, int]) -> Dict[str, Array]:
  """Attention weights (..., keys) cut into the named key groups, in order."""
  out, start = {}, 0
  for name, n in sizes.items():
    out[name] = weights[..., start:start + n]
    start += n
  return out


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

  Two ways to skip work whose result nobody reads, both exact: `memory` tokens are tokens this
  layer only attends to (their LN -> key/value projections are computed; no query, residual or
  MLP), and `query_rows=m` computes the outputs of the first m rows only (all rows still serve as
  keys).
  """

  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, x: Array, *, memory: Optional[Array] = None,
               extra_kv: Optional[KeyValue] = None, key_mask: Optional[Array] = None,
               query_rows: Optional[int] = None,
               mlp_hook: Optional[Callable[[Array], Array]] = None, train: bool = False) -> Array:
    norm = nn.LayerNorm(epsilon=LN_EPS, name="LayerNorm_0")
    y = norm(x)
    if query_rows is not None:
      x = x[:, :query_rows]
    if memory is not None:
      with jax.named_scope("kv_only_prompts"):
        memory = norm(memory if memory.ndim == 3 else memory[None])
    y = MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                     name="MultiHeadDotProductAttention_0")(
                                         y if query_rows is None else y[:, :query_rows], y,
                                         memory=memory, extra_kv=extra_kv, key_mask=key_mask)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    x = x + y
    y = nn.LayerNorm(epsilon=LN_EPS, name="LayerNorm_1")(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.approximate_gelu,
                 name="MlpBlock_0")(y, train=train)
    if mlp_hook is not None:
      y = mlp_hook(y)
    y = nn.Dropout(self.dropout)(y, deterministic=not train)
    return x + y


class _PositionalBlock(Encoder1DBlock):
  """Encoder1DBlock with positional arguments, which `nn.remat` needs to mark the static ones.

  The hooks module comes as an argument (not a bound method), so the lifted transform sees its
  variables (adapters' MLP-output hook reads its own parameters inside the recomputed block).
  """

  def __call__(self, x, memory, extra_kv, key_mask, hooks, layer, query_rows,  # type: ignore
               train):
    mlp_hook = None if hooks is None else functools.partial(hooks.mlp_output, layer, train=train)
    return super().__call__(x, memory=memory, extra_kv=extra_kv, key_mask=key_mask,
                            query_rows=query_rows, mlp_hook=mlp_hook, train=train)


def _remat_block(remat: str) -> Any:
  """The block recomputed in the backward pass (`remat`: see the module docstring)."""
  policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if remat == "dots" else None
  return nn.remat(_PositionalBlock, policy=policy, static_argnums=(6, 7, 8))


class Encoder(nn.Module):
  """The stack of blocks plus the final LayerNorm, with the hook points per layer.

  class_token_only: the last layer computes the class-token row only (its other outputs would
  be thrown away by 'token' pooling), so `encoded` is then (batch, 1, D).
  final_norm: False leaves out `encoder_norm` (models that normalise the pooled feature instead).
  """

  depth: int
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  class_token_only: bool = False
  approximate_gelu: bool = True
  final_norm: bool = True
  remat: str = "none"

  @nn.compact
  def __call__(self, x: Array, *, hooks: Optional[Hooks] = None, start_layer: int = 0,
               num_prompts: int = 0, train: bool = False) -> Tuple[Array, int]:
    """(the encoded tokens, how many of them after the prefix are prompts)."""
    if self.remat not in REMAT:
      raise ValueError(f"unknown remat {self.remat!r}; expected one of {REMAT}")
    for i in range(start_layer, self.depth):
      step, mlp_hook = LayerInput(x, num_prompts), None
      if hooks is not None:
        step = hooks.layer(i, x, num_prompts=num_prompts, train=train)
        mlp_hook = functools.partial(hooks.mlp_output, i, train=train)
      num_prompts = step.num_prompts
      last = self.class_token_only and i == self.depth - 1
      query_rows = 1 if last else None
      if self.remat == "none":
        block = Encoder1DBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                               self.approximate_gelu, name=f"encoderblock_{i}")
        x = block(step.tokens, memory=step.memory, extra_kv=step.extra_kv, key_mask=step.key_mask,
                  query_rows=query_rows, mlp_hook=mlp_hook, train=train)
      else:
        block = _remat_block(self.remat)(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                                         self.approximate_gelu, name=f"encoderblock_{i}")
        x = block(step.tokens, step.memory, step.extra_kv, step.key_mask, hooks, i, query_rows,
                  train)
      self.sow("intermediates", f"block_{i}", x)
    if not self.final_norm:
      return x, num_prompts
    return nn.LayerNorm(epsilon=LN_EPS, name="encoder_norm")(x), num_prompts


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): a learned probe attends over the tokens.

  pooled = a + MLP(LN(a)) with a = MHA(probe, tokens); no residual around the attention.
  """

  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, _, d = x.shape
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d))
    probe = jnp.broadcast_to(probe, (n, 1, d))
    a = MultiHeadDotProductAttention(self.num_heads, dtype=self.dtype,
                                     name="MultiHeadDotProductAttention_0")(probe, x)
    y = nn.LayerNorm(epsilon=LN_EPS, name="LayerNorm_0")(a)
    a = a + MlpBlock(self.mlp_dim, dtype=self.dtype, name="MlpBlock_0")(y)
    return a[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier. `apply(variables, images)` takes NHWC images in [-1, 1] and returns logits.

  Attributes:
    image_size: (height, width) the position embedding is laid out for.
    patch_size: (height, width) of a patch (= conv kernel and stride).
    width, depth, num_heads, mlp_dim: transformer size.
    num_classes: head size; None for no head (the model returns the pre-logits features).
    pool_type: 'token' (class token row), 'gap' (mean of all tokens), 'gap_patches' (mean of all
      tokens but the class token: MAE's global pool) or 'map' (attention pooling).
    class_token: whether a learned class token is prepended.
    posemb_cls_row: vit_jax layout, where pos_embedding has a row for the class token and is added
      after the token is prepended; otherwise (big_vision) it covers the patches only.
    representation_size: width of the tanh `pre_logits` layer, or None.
    map_num_heads, map_mlp_dim: MAP head size (default: the encoder's).
    in_channels: input channels of the patch embedding.
    dropout: dropout rate in the blocks (0.0 in all the originals' transfer configs).
    dtype: compute dtype of matmuls and convolutions (e.g. jnp.bfloat16).
    hooks: optional `Hooks` module (prompts, key-value prompts, adapters, heads).
    fast_path: compute only what the output needs (exact, same logits and gradients): with
      'token' pooling the last layer computes the class-token row only. Prompt hooks read it when
      attached (VPT-deep prompts whose outputs the next layer discards become keys/values only).
      False: the straightforward computation of every row (all intermediates full size).
    approximate_gelu: True (default) the tanh form of GELU (the Google checkpoints); False the
      exact erf form (PyTorch's nn.GELU: MAE, MoCo v3).
    remat: 'none', 'block' or 'dots': what the backward pass recomputes instead of storing
      (module docstring); the same logits and gradients, less memory.
    fc_norm: the final LayerNorm normalises the pooled feature (`fc_norm`, MAE's global pool)
      instead of every token (`Transformer/encoder_norm`).
  """

  image_size: Tuple[int, int]
  patch_size: Tuple[int, int]
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  num_classes: Optional[int] = None
  pool_type: str = "token"
  class_token: bool = True
  posemb_cls_row: bool = False
  representation_size: Optional[int] = None
  map_num_heads: Optional[int] = None
  map_mlp_dim: Optional[int] = None
  in_channels: int = 3
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  hooks: Optional[Hooks] = None
  fast_path: bool = True
  approximate_gelu: bool = True
  fc_norm: bool = False
  remat: str = "none"

  @property
  def grid(self) -> Tuple[int, int]:
    return (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])

  def _check(self, images: Array) -> None:
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"unknown pool_type {self.pool_type!r}; expected one of {POOL_TYPES}")
    if self.pool_type == "token" and not self.class_token:
      raise ValueError("pool_type='token' needs class_token=True")
    if self.posemb_cls_row and not self.class_token:
      raise ValueError("posemb_cls_row=True needs class_token=True")
    for s, p in zip(self.image_size, self.patch_size):
      if s % p:
        raise ValueError(f"image_size {tuple(self.image_size)} is not a multiple of "
                         f"patch_size {tuple(self.patch_size)}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (*self.image_size, self.in_channels):
      raise ValueError(
          f"images of shape {tuple(images.shape)} do not fit this model, which expects "
          f"(batch, {self.image_size[0]}, {self.image_size[1]}, {self.in_channels}) NHWC; "
          "load the checkpoint with load_pretrained(..., image_size=...) to change the resolution")

  def _embed(self, images: Array, *, train: bool) -> Tuple[Array, int]:
    """Layer 0's input (patch embedding, class token, position embedding, inserted tokens) and
    how many tokens the hooks inserted."""
    self._check(images)
    embedding = nn.Conv(self.width, tuple(self.patch_size), strides=tuple(self.patch_size),
                        padding="VALID", dtype=self.dtype, name="embedding")
    inserted = None
    if self.hooks is None:
      x = embedding(images)
    else:
      x, inserted = self.hooks.embed(images, embedding, train=train)
    x = x.astype(jnp.float32)
    self.sow("intermediates", "stem", x)
    n, gh, gw, d = x.shape
    x = x.reshape(n, gh * gw, d)

    rows = gh * gw + int(self.posemb_cls_row)
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=0.02), (1, rows, d))
    if self.class_token:
      cls = self.param("cls", nn.initializers.zeros, (1, 1, d))
      cls = jnp.broadcast_to(cls, (n, 1, d))
      if self.posemb_cls_row:
        x = jnp.concatenate([cls, x], axis=1) + posemb
      else:
        x = jnp.concatenate([cls, x + posemb], axis=1)
    else:
      x = x + posemb
    if inserted is not None:
      prefix = int(self.class_token)
      inserted = jnp.broadcast_to(inserted, (n,) + inserted.shape[-2:]).astype(x.dtype)
      x = jnp.concatenate([x[:, :prefix], inserted, x[:, prefix:]], axis=1)
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return x, 0 if inserted is None else inserted.shape[1]

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False, start_layer: int = 0) -> Array:
    """Logits (or features when num_classes is None) for NHWC `images` in [-1, 1].

    start_layer > 0 enters the model later: `images` is then the (batch, tokens, width) sequence
    that encoder layer `start_layer` receives (the sown 'block_{start_layer - 1}' output; with
    start_layer == depth, the encoder output before its final LayerNorm). The layers before it are
    never built, so a frozen prefix can be computed once and cached (the cached-features path).
    """
    if not 0 <= start_layer <= self.depth:
      raise ValueError(f"start_layer={start_layer} must be in 0..{self.depth}")
    if start_layer:
      if images.ndim != 3 or images.shape[-1] != self.width:
        raise ValueError(f"start_layer={start_layer} takes (batch, tokens, {self.width}) token "
                         f"sequences, got shape {tuple(images.shape)}")
      # The cached-prefix entry comes before any layer a hook changes: no prompts in it yet.
      x, images, num_prompts = images.astype(jnp.float32), None, 0
    else:
      x, num_prompts = self._embed(images, train=train)
    x, num_prompts = Encoder(
        self.depth, self.num_heads, self.mlp_dim, self.dropout, self.dtype,
        class_token_only=self.fast_path and self.pool_type == "token",
        approximate_gelu=self.approximate_gelu, final_norm=not self.fc_norm, remat=self.remat,
        name="Transformer")(
            x, hooks=self.hooks, start_layer=start_layer, num_prompts=num_prompts, train=train)
    self.sow("intermediates", "encoded", x)
    if self.hooks is not None:
      x = self.hooks.after_encoder(x, num_prompts=num_prompts, train=train)

    if self.pool_type == "token":
      x = x[:, 0]
    elif self.pool_type == "gap":
      x = jnp.mean(x, axis=1)
    elif self.pool_type == "gap_patches":
      x = jnp.mean(x[:, int(self.class_token):], axis=1)
    else:
      x = MAPHead(self.map_num_heads or self.num_heads, self.map_mlp_dim or self.mlp_dim,
                  dtype=self.dtype, name="MAPHead_0")(x)
    self.sow("intermediates", "pooled", x)
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=LN_EPS, name="fc_norm")(x)

    if self.representation_size:
      x = jnp.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
    if self.hooks is not None:
      x = self.hooks.head_input(x, images, train=train)
    self.sow("intermediates", "head_input", x)

    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)
    return x


def as_pair(v: int | Sequence[int]) -> Tuple[int, int]:
  """7 -> (7, 7); (h, w) -> (h, w)."""
  if isinstance(v, int):
    return (v, v)
  h, w = v
  return (int(h), int(w))
