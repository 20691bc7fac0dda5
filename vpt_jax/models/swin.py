"""A linen Swin Transformer (Liu et al. 2021) that loads the published microsoft/Swin-Transformer
`.pth` checkpoints exactly, with hook points for prompts inside windows.

Parameter tree (linen names; `vpt_jax.weights.torch_swin.convert_state_dict` maps the torch keys
onto it):

    patch_embed/proj/{kernel,bias}            conv, kernel HWIO  (torch OIHW, transposed 2,3,1,0)
    patch_embed/norm/{scale,bias}             LayerNorm          (torch weight -> scale)
    layers_{i}/blocks_{j}/norm1, norm2        LayerNorm
    layers_{i}/blocks_{j}/attn/relative_position_bias_table   ((2ws-1)^2, heads), as stored
    layers_{i}/blocks_{j}/attn/qkv/{kernel,bias}   kernel (C, 3C) = torch weight.T; the output
                                              channels stay [q | k | v], each head-major (h*hd + d)
    layers_{i}/blocks_{j}/attn/proj, mlp/fc1, mlp/fc2          Dense, kernel = torch weight.T
    layers_{i}/downsample/norm, reduction/kernel              patch merging at the END of stage i
    norm/{scale,bias}, head/{kernel,bias}     final LayerNorm, classifier

The `relative_position_index` and `attn_mask` buffers of the files are not parameters: they are
recomputed here (`relative_position_index`, `attention_mask`) and the converter checks that the
file's buffers equal them, naming the key on a mismatch.

Numerics follow the original: LayerNorm eps 1e-5 everywhere, exact-erf GELU, q scaled by
head_dim**-0.5 before q.k, relative position bias added after the scaling, mask -100 between
tokens of different shifted regions, patch-merge channel order (even row, even col), (odd row,
even col), (even row, odd col), (odd row, odd col), mean pooling after the final LayerNorm. A
stage whose resolution is <= the window uses one window of the whole map and no shift.

Prompts (`SwinHooks`) are carried as a separate (batch, P, C) stream next to the (batch, H*W, C)
patch tokens rather than as the first P rows of one sequence: window partitioning, shifting and
merging concern the patch grid only, and each image's prompts are paired with that image's windows
by construction. The sown intermediates put the prompt rows first, as the official code does.
"""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
KeyValue = Tuple[Array, Array]

LN_EPS = 1e-5
MASK_VALUE = -100.0


# -- geometry and derived buffers -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one stage computes: its grid, width, heads, effective window and odd-block shift."""
  resolution: Tuple[int, int]
  dim: int
  num_heads: int
  depth: int
  window: int
  shift: int

  @property
  def num_windows(self) -> int:
    return (self.resolution[0] // self.window) * (self.resolution[1] // self.window)

  def block_shift(self, block: int) -> int:
    return self.shift if block % 2 else 0


def stages(grid: Tuple[int, int], embed_dim: int, depths: Sequence[int],
           num_heads: Sequence[int], window_size: int) -> List[Stage]:
  """Stage geometry; the window shrinks to the map (and the shift goes) when the map is small."""
  if len(depths) != len(num_heads):
    raise ValueError(f"depths {tuple(depths)} and num_heads {tuple(num_heads)} differ in length")
  out = []
  h, w = grid
  for i, (depth, heads) in enumerate(zip(depths, num_heads)):
    dim = embed_dim * 2 ** i
    if min(h, w) <= window_size:
      window, shift = min(h, w), 0
    else:
      window, shift = window_size, window_size // 2
    if h % window or w % window:
      raise ValueError(f"stage {i}: resolution {h}x{w} is not a multiple of the window {window} "
                       "(choose image_size so every stage's grid divides into windows)")
    if dim % heads:
      raise ValueError(f"stage {i}: width {dim} is not divisible by num_heads={heads}")
    out.append(Stage((h, w), dim, heads, depth, window, shift))
    if i < len(depths) - 1:
      if h % 2 or w % 2:
        raise ValueError(f"stage {i}: resolution {h}x{w} is odd; patch merging needs even sizes")
      h, w = h // 2, w // 2
  return out


def relative_position_index(window: int) -> np.ndarray:
  """(ws^2, ws^2) int64: index[i, j] = (y_i - y_j + ws - 1) * (2ws - 1) + (x_i - x_j + ws - 1).

  i is the query, j the key; tokens row-major in the window. bias[h, i, j] = table[index[i, j], h].
  """
  y, x = np.divmod(np.arange(window * window), window)
  dy = y[:, None] - y[None, :] + window - 1
  dx = x[:, None] - x[None, :] + window - 1
  return (dy * (2 * window - 1) + dx).astype(np.int64)


def attention_mask(resolution: Tuple[int, int], window: int, shift: int) -> np.ndarray:
  """(nW, ws^2, ws^2) float32: 0 within a region of the cyclically shifted map, -100 across.

  Bands along each axis: [0, R - ws), [R - ws, R - s), [R - s, R); region = 3 * row band + col band.
  """
  h, w = resolution

  def bands(n):
    b = np.zeros(n, np.int64)
    b[n - window:n - shift] = 1
    b[n - shift:] = 2
    return b

  labels = 3 * bands(h)[:, None] + bands(w)[None, :]
  win = labels.reshape(h // window, window, w // window, window).transpose(0, 2, 1, 3)
  win = win.reshape(-1, window * window)
  return np.where(win[:, :, None] == win[:, None, :], 0.0, MASK_VALUE).astype(np.float32)


def window_partition(x: Array, window: int) -> Array:
  """(B, H, W, C) -> (B * nW, ws * ws, C); row r = b * nW + wy * (W / ws) + wx."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def window_reverse(x: Array, window: int, h: int, w: int) -> Array:
  """Inverse of `window_partition`: (B * nW, ws * ws, C) -> (B, H, W, C)."""
  c = x.shape[-1]
  x = x.reshape(-1, h // window, w // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, h, w, c)


# -- hooks --------------------------------------------------------------------------------------


class SwinHooks(nn.Module):
  """Identity hooks; subclass and override to add prompts to a `SwinTransformer`.

  Prompts in Swin differ from prompts in a ViT in three places, hence a hook for each:

  * `before_block`: tokens enter (stage 0, block 0) or are replaced (VPT-deep) before any block,
    not only at the encoder input; the prompt stream is (batch, P, C) in the stage's width.
  * `extra_kv`: E2VPT's key/value prompts are appended inside every window's attention, after the
    qkv projection, in front of the keys and values.
  * `merge_prompts`: patch merging changes the width (4C -> 2C), so a family-specific rule says
    what the prompts become (the official code tiles them 4x and merges them with the patches).

  and `pool_tokens` (whether the mean pooling sees the prompt outputs), `prompt_outputs_read`
  (lets the model skip prompt queries whose outputs the next block discards: exact) and
  `batch_order_quirk` (the official window/prompt pairing, for reproducing its batch outputs).
  Variables live wherever the subclass puts them (VPT uses the 'prompts' collection).
  """

  def batch_order_quirk(self) -> bool:
    """True: window row r gets the prompts of batch entry r % B and prompt outputs are averaged
    over rows with r % B = b, as KMnP/vpt and E2VPT do. False (default): per-image prompts."""
    return False

  def before_block(self, stage: int, block: int, prompts: Optional[Array], *, batch: int,
                   train: bool) -> Optional[Array]:
    """The (batch, P, C) prompt rows of the residual stream that block (stage, block) receives,
    given those that came out of the previous block / patch merging (None = no prompts)."""
    del stage, block, batch, train
    return prompts

  def prompt_outputs_read(self, stage: int, block: int) -> bool:
    """False when nobody reads the prompt outputs of this block (the next block replaces them),
    so the block may compute their keys and values only."""
    del stage, block
    return True

  def extra_kv(self, stage: int, block: int, *, train: bool) -> Optional[KeyValue]:
    """Extra (keys, values), each (heads, T, head_dim), put in front of every window's keys and
    values, with zero position bias and mask; None = none."""
    del stage, block, train
    return None

  def merge_prompts(self, stage: int, prompts: Array, *, train: bool) -> Optional[Array]:
    """The (batch, P, 4C) rows that stage `stage`'s patch merging (LayerNorm + reduction) turns
    into the next stage's prompts, or None to drop the prompts."""
    del stage, train
    return jnp.concatenate([prompts] * 4, axis=-1)

  def pool_tokens(self, x: Array, prompts: Optional[Array]) -> Array:
    """The (batch, n, C) final-normed tokens whose mean the head reads."""
    if prompts is None:
      return x
    return jnp.concatenate([prompts, x], axis=1)


# -- modules ------------------------------------------------------------------------------------


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LN_EPS, name=name)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    y = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    y = nn.gelu(y, approximate=False)
    return nn.Dense(d, dtype=self.dtype, name="fc2")(y)


def _pair_windows(t: Array, num_windows: int, quirk: bool) -> Array:
  """(B, ...) per-image values -> (B * nW, ...) per window row."""
  if quirk:  # row r gets entry r % B
    return jnp.tile(t, (num_windows,) + (1,) * (t.ndim - 1))
  return jnp.repeat(t, num_windows, axis=0)


def _gather_windows(t: Array, batch: int, quirk: bool) -> Array:
  """(B * nW, ...) per window row -> (B, ...) mean over the rows paired with each image."""
  nw = t.shape[0] // batch
  if quirk:
    return t.reshape((nw, batch) + t.shape[1:]).mean(0)
  return t.reshape((batch, nw) + t.shape[1:]).mean(1)


class WindowAttention(nn.Module):
  """Multi-head attention within windows, with relative position bias and optional prompts.

  Keys/values per window: [extra kv (T); prompts (P); window tokens (N)], the official order.
  The bias and mask apply to window-token pairs only (zero for every pair with a prompt).
  Prompts are projected once per image, not once per window copy (identical values).
  """
  dim: int
  num_heads: int
  window: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, win: Array, prompts: Optional[Array], *, batch: int,
               mask: Optional[np.ndarray], extra_kv: Optional[KeyValue],
               prompt_queries: bool, quirk: bool) -> Tuple[Array, Optional[Array]]:
    """win: (B * nW, N, C) normed window tokens; prompts: (B, P, C) normed prompt rows or None.

    Returns the projected outputs of the window tokens (B * nW, N, C) and of the prompts, averaged
    over each image's windows (B, P, C), or None when there are none or `prompt_queries` is False.
    """
    nh, ws = self.num_heads, self.window
    hd = self.dim // nh
    rows, n, _ = win.shape
    nw = rows // batch
    table = self.param("relative_position_bias_table", nn.initializers.truncated_normal(0.02),
                       ((2 * ws - 1) ** 2, nh))
    qkv_layer = nn.Dense(3 * self.dim, dtype=self.dtype, name="qkv")
    proj = nn.Dense(self.dim, dtype=self.dtype, name="proj")

    def heads(t):  # (..., L, 3C) -> q, k, v each (..., heads, L, hd)
      t = t.reshape(t.shape[:-1] + (3, nh, hd))
      t = jnp.moveaxis(t, -3, 0)
      return tuple(jnp.swapaxes(t[i], -2, -3) for i in range(3))

    q, k, v = heads(qkv_layer(win))
    scale = hd ** -0.5
    bias = jnp.take(table, jnp.asarray(relative_position_index(ws).reshape(-1)), axis=0)
    bias = bias.reshape(n, n, nh).transpose(2, 0, 1)  # (nh, N, N)

    extra = []  # key/value blocks in front of the window tokens, no bias, no mask
    if extra_kv is not None:
      ek, ev = extra_kv
      ek = jnp.broadcast_to(ek.astype(k.dtype), (rows,) + ek.shape)
      ev = jnp.broadcast_to(ev.astype(v.dtype), (rows,) + ev.shape)
      extra.append((ek, ev))
    pq = None
    if prompts is not None:
      p_q, p_k, p_v = heads(qkv_layer(prompts))  # (B, nh, P, hd)
      extra.append((_pair_windows(p_k, nw, quirk), _pair_windows(p_v, nw, quirk)))
      if prompt_queries:
        pq = _pair_windows(p_q, nw, quirk)
    keys = jnp.concatenate([e[0] for e in extra] + [k], axis=-2)
    values = jnp.concatenate([e[1] for e in extra] + [v], axis=-2)
    front = keys.shape[-2] - n

    def attend(queries, positional):
      logits = jnp.einsum("rhqd,rhkd->rhqk", queries * scale, keys,
                          preferred_element_type=jnp.float32)
      if positional:  # bias (and mask of window r % nW) on window-token pairs only
        logits = logits + jnp.pad(bias, ((0, 0), (0, 0), (front, 0)))[None]
        if mask is not None:
          shape = logits.shape
          m = jnp.pad(jnp.asarray(mask), ((0, 0), (0, 0), (front, 0)))
          logits = (logits.reshape((batch, nw) + shape[1:]) + m[None, :, None]).reshape(shape)
      w = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
      y = jnp.einsum("rhqk,rhkd->rhqd", w, values)
      return jnp.swapaxes(y, 1, 2).reshape(rows, queries.shape[-2], self.dim)

    out = proj(attend(q, True))
    p_out = None
    if pq is not None:
      p_out = proj(_gather_windows(attend(pq, False), batch, quirk))
    return out, p_out


class SwinBlock(nn.Module):
  """x + attn(LN(x)) over (shifted) windows, then x + MLP(LN(x)); prompts ride along."""
  stage: Stage
  shift: int
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, prompts: Optional[Array], *, extra_kv: Optional[KeyValue] = None,
               prompt_queries: bool = True, quirk: bool = False
               ) -> Tuple[Array, Optional[Array]]:
    st, s = self.stage, self.shift
    (h, w), c, ws = st.resolution, st.dim, st.window
    b = x.shape[0]
    norm1 = _layer_norm("norm1")
    y = norm1(x).reshape(b, h, w, c)
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
    win = window_partition(y, ws)
    mask = attention_mask((h, w), ws, s) if s else None
    out, p_out = WindowAttention(c, st.num_heads, ws, self.dtype, name="attn")(
        win, None if prompts is None else norm1(prompts), batch=b, mask=mask,
        extra_kv=extra_kv, prompt_queries=prompt_queries, quirk=quirk)
    y = window_reverse(out, ws, h, w)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    x = x + y.reshape(b, h * w, c)
    norm2 = _layer_norm("norm2")
    mlp = Mlp(int(c * self.mlp_ratio), self.dtype, name="mlp")
    x = x + mlp(norm2(x))
    if prompts is not None and p_out is not None:
      prompts = prompts + p_out
      prompts = prompts + mlp(norm2(prompts))
    elif prompts is not None:
      prompts = None  # not read by anyone (the next block replaces them)
    return x, prompts


class PatchMerging(nn.Module):
  """2x2 neighbourhood -> 4C (order x0, x1, x2, x3 as the original) -> LN -> Dense(2C, no bias)."""
  resolution: Tuple[int, int]
  dim: int

  @nn.compact
  def __call__(self, x: Array, prompts: Optional[Array]) -> Tuple[Array, Optional[Array]]:
    h, w = self.resolution
    b = x.shape[0]
    g = x.reshape(b, h, w, self.dim)
    m = jnp.concatenate([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]],
                        axis=-1).reshape(b, h * w // 4, 4 * self.dim)
    norm = _layer_norm("norm")
    reduction = nn.Dense(2 * self.dim, use_bias=False, name="reduction")
    x = reduction(norm(m))
    if prompts is not None:
      prompts = reduction(norm(prompts))
    return x, prompts


def _with_prompts(x: Array, prompts: Optional[Array]) -> Array:
  return x if prompts is None else jnp.concatenate([prompts, x], axis=1)


class PatchEmbed(nn.Module):
  """Stride-p convolution, flattened row-major, then LayerNorm (prompts never pass through it)."""
  patch_size: int
  embed_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                name="proj")(images).astype(jnp.float32)
    return _layer_norm("norm")(x.reshape(x.shape[0], -1, self.embed_dim))


class BasicLayer(nn.Module):
  """One stage: its blocks, then (all but the last stage) its patch merging `downsample`."""
  stage: Stage
  index: int
  merge: bool
  mlp_ratio: float = 4.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, prompts: Optional[Array], *, hooks: Optional[SwinHooks],
               fast_path: bool, train: bool
               ) -> Tuple[Array, Optional[Array], List[Tuple[str, Array]]]:
    """Returns the stage output, its prompt rows and the named intermediate outputs."""
    st, i = self.stage, self.index
    quirk = hooks is not None and hooks.batch_order_quirk()
    b = x.shape[0]
    seen = []
    for j in range(st.depth):
      kv, read = None, True
      if hooks is not None:
        prompts = hooks.before_block(i, j, prompts, batch=b, train=train)
        kv = hooks.extra_kv(i, j, train=train)
        read = not fast_path or hooks.prompt_outputs_read(i, j)
      x, prompts = SwinBlock(st, st.block_shift(j), self.mlp_ratio, self.dtype,
                             name=f"blocks_{j}")(x, prompts, extra_kv=kv, prompt_queries=read,
                                                 quirk=quirk)
      seen.append((f"block_{i}_{j}", _with_prompts(x, prompts)))
    if self.merge:
      if prompts is not None and hooks is not None:
        prompts = hooks.merge_prompts(i, prompts, train=train)
      x, prompts = PatchMerging(st.resolution, st.dim, name="downsample")(x, prompts)
      seen.append((f"merge_{i}", _with_prompts(x, prompts)))
    return x, prompts, seen


class SwinTransformer(nn.Module):
  """Swin classifier. `apply(variables, images)` takes NHWC images (already normalised).

  Attributes:
    image_size: (height, width).
    patch_size: patch (= conv kernel and stride) side.
    embed_dim, depths, num_heads, window_size, mlp_ratio: the architecture (stage i has width
      embed_dim * 2**i).
    num_classes: head size; None = no head (returns the pooled features).
    in_channels: input channels.
    dtype: compute dtype of the matmuls; parameters, LayerNorms and softmax stay float32.
    hooks: optional `SwinHooks` (prompts).
    fast_path: let hooks skip prompt queries whose outputs are discarded (exact). False computes
      every row, so the sown block outputs hold every prompt row (for comparisons).
  Sown 'intermediates': stem (patch_embed output), block_{i}_{j}, merge_{i}, final_norm, pooled
  (prompt rows first in the token sequences).
  """
  image_size: Tuple[int, int] = (224, 224)
  patch_size: int = 4
  embed_dim: int = 96
  depths: Tuple[int, ...] = (2, 2, 6, 2)
  num_heads: Tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  num_classes: Optional[int] = 1000
  in_channels: int = 3
  dtype: Dtype = jnp.float32
  hooks: Optional[SwinHooks] = None
  fast_path: bool = True

  @property
  def grid(self) -> Tuple[int, int]:
    return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

  @property
  def stages(self) -> List[Stage]:
    for s in self.image_size:
      if s % self.patch_size:
        raise ValueError(f"image_size {tuple(self.image_size)} is not a multiple of patch_size "
                         f"{self.patch_size}")
    return stages(self.grid, self.embed_dim, self.depths, self.num_heads, self.window_size)

  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  # What the trainer's generic code reads of any backbone (`vpt_jax.tuning.families`).
  @property
  def depth(self) -> int:
    """Blocks in all stages."""
    return int(sum(self.depths))

  @property
  def width(self) -> int:
    """Width of the pooled features the head reads."""
    return self.num_features

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    want = (*self.image_size, self.in_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"images of shape {tuple(images.shape)} do not fit this model, which "
                       f"expects (batch, {want[0]}, {want[1]}, {want[2]}) NHWC")
    hooks = self.hooks
    x = PatchEmbed(self.patch_size, self.embed_dim, self.dtype, name="patch_embed")(images)
    self.sow("intermediates", "stem", x)
    prompts = None
    all_stages = self.stages
    for i, st in enumerate(all_stages):
      x, prompts, seen = BasicLayer(st, i, i < len(all_stages) - 1, self.mlp_ratio, self.dtype,
                                    name=f"layers_{i}")(x, prompts, hooks=hooks,
                                                        fast_path=self.fast_path, train=train)
      for name, value in seen:
        self.sow("intermediates", name, value)
    norm = _layer_norm("norm")
    x = norm(x)
    if prompts is not None:
      prompts = norm(prompts)
    self.sow("intermediates", "final_norm", _with_prompts(x, prompts))
    tokens = x if hooks is None else hooks.pool_tokens(x, prompts)
    x = jnp.mean(tokens, axis=1)
    self.sow("intermediates", "pooled", x)
    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)
    return x
