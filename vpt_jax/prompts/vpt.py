"""Visual Prompt Tuning (Jia et al., ECCV 2022) as hooks (`vpt_jax.models.hooks`) of a backbone.

The prompts are variables of the 'prompts' collection (path `prompts/hooks/...`), separate from the
frozen checkpoint in 'params'. `attach(model, config)` returns the ViT with the prompts plugged in.

Semantics, for the set S of prompted layers (0-based):

* before a layer in S: if the sequence holds prompt tokens they are **replaced** by this layer's
  prompts (the previous layer's prompt outputs are discarded, as in the paper's VPT-deep equations
  and the official code), otherwise the prompts are inserted after the class token;
* before a layer not in S: prompt tokens flow through, or with `expand=False` ("no expand") are
  dropped once past the last prompted layer;
* VPT-shallow is S = {0}; VPT-deep is all layers; `depth=k` is the first k (`reverse`: last k).

Which of these happens at each layer is the module's `plan` (`vpt_jax.prompts.plan`), computed
once by `attach`, fast path included; the multi-task server follows the same plan.

Prompts are inserted after the position embedding, so they carry none; which is why their place in
the sequence does not matter ([x, P, E] and [x, E, P] give the same class-token output).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpt_jax import utils
from vpt_jax.models.hooks import Hooks, LayerInput
from vpt_jax.models.vit import VisionTransformer
from vpt_jax.prompts import e2vpt
from vpt_jax.prompts import plan as plan_lib
from vpt_jax.prompts.plan import prompted_layers

Array = jax.Array

LOCATIONS = ("prepend", "add", "add-1", "prepend-pixel", "pad", "concat-channel")
PIXEL_LOCATIONS = ("prepend-pixel", "pad", "concat-channel")
POOLS = ("original", "cls", "image", "prompt", "all")


def default_config() -> ml_collections.ConfigDict:
  """The `prompt` section of a config; every option of the paper's ablations.

  length: p, prompt tokens per prompted layer (0 = no prompts: the plain ViT, exactly; for 'add'
    and 'add-1' any length > 0 switches them on, their size is set by the sequence).
  deep: prompts before every prompted layer (VPT-deep); False = before layer 1 only (shallow).
  depth: deep only; prompt the first `depth` layers (0 = all).
  reverse: with depth; prompt the last `depth` layers instead (the paper's top-to-bottom runs).
  shared: deep only; one prompt set reused at every prompted layer ("deep-shared").
  expand: False drops the prompt tokens after the last prompted layer ("no expand").
  location: 'prepend' (default), 'add' (one prompt per token added element-wise; length is the
    number of tokens), 'add-1' (one vector added to all tokens), 'prepend-pixel' (length pixel
    patches through the frozen patch embedding), 'pad' (a learnable border `length` pixels wide;
    the image is resized to fit inside it), 'concat-channel' (`length` extra learnable input
    channels, with their own trainable slice of the patch-embedding kernel).
  pool: what the head reads: 'original' (the backbone's pooling over the non-prompt tokens: the
    class token for vit_jax models), 'cls', 'image' (mean of image-patch outputs), 'prompt' (mean of
    prompt outputs), 'all' (mean of prompt and patch outputs: the paper's global pool).
  init: 'uniform' (U(-v, v), v = sqrt(6 / (3 * patch_h * patch_w + d)) as the paper), or a path
    to a .npy array of shape (length, d) or (prompted layers, length, d) (e.g. class-token
    embeddings); loaded by `init_from_array`.
  dropout: dropout rate on the prompt tokens (training only).
  project: >0: prompts live in this smaller dimension and a trainable Dense maps them to d.
  kv_length: E2VPT key-value prompts: this many learnable tokens appended to the keys and values
    (after their projections, per head) inside the attention of every layer; 0 = none. Queries
    get none, so the sequence keeps its length.
  kv_shared: one tensor per layer serves as both the extra keys and the extra values (the
    official E2VPT code); False learns separate key and value prompts.
  kv_deep: key-value prompts in every layer; False = in the first layer only.
  masks: E2VPT pruning masks on the visual prompts: a token mask (length,) and a segment mask
    (length, segments), one pair shared by every prompted layer as in the official code, in the
    frozen 'prompt_masks' collection. Prompt token t is multiplied by token_mask[t] and dimension
    j of it by segment_mask[t, j % segments] (segments strided across the dimensions, as the
    official code). A token whose mask is 0 is removed from attention (never a key or value), so
    a masked model computes exactly what the compact pruned model computes.
  segments: R, the number of segments per prompt token (must divide the width).
  init_seed: seed of the random prompt initialisation; -1 = the run's `seed` (E2VPT rewinding
    with a fresh init changes only this, not the data order).
  mask_file: '' (all ones: nothing pruned) or a .npz with 'tokens' (length,) and 'segments'
    (length, segments) 0/1 arrays, as written by `python -m vpt_jax.prune`.
  """
  return ml_collections.ConfigDict(dict(
      length=50, deep=True, depth=0, reverse=False, shared=False, expand=True,
      location="prepend", pool="original", init="uniform", dropout=0.0, project=0, kv_length=0,
      kv_shared=True, kv_deep=True, masks=False, segments=16, mask_file="", init_seed=-1))


def prompt_values(tokens: Array, *, projection: Optional[Tuple[Array, Array]] = None,
                  masks: Optional[Tuple[Array, Array]] = None) -> Array:
  """Stored prompts (..., p, dp) -> the (..., p, d) tokens a layer receives: projected by the
  (kernel, bias) `projection`, times the E2VPT (token, segment) `masks`. Shared by the prompt
  module and the multi-task server, so both build the same prompt set."""
  if projection is not None:
    tokens = tokens @ projection[0] + projection[1]
  if masks is not None:
    tokens = e2vpt.apply_masks(tokens, *masks)
  return tokens


def _uniform(bound: float) -> Callable:
  return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class VPT(Hooks):
  """Prompt provider; build it with `attach`, which fills in the model-dependent fields."""

  length: int
  layers: Tuple[int, ...]
  width: int
  patch_size: Tuple[int, int]
  image_size: Tuple[int, int]
  in_channels: int
  num_prefix: int           # 1 when the model has a class token
  num_patches: int          # gh * gw
  shared: bool = False
  expand: bool = True
  location: str = "prepend"
  pool: str = "original"
  dropout: float = 0.0
  project: int = 0
  kv_length: int = 0
  kv_shared: bool = True
  kv_layers: Tuple[int, ...] = ()
  num_heads: int = 1
  masks: bool = False
  segments: int = 16
  mask_digest: str = ""     # sha256 of the mask values (part of a run's fingerprint)
  # What happens to the prompt tokens at every layer (`plan.PromptPlan`); derived, not an option.
  plan: Optional[plan_lib.PromptPlan] = None

  @property
  def kv_only_layers(self) -> Tuple[int, ...]:
    """Prompted layers whose prompt outputs nobody reads: their prompts are keys/values only."""
    return self.plan.memory_layers if self.plan is not None else ()

  @property
  def init_bound(self) -> float:
    """sqrt(6 / (3 patch^2 + prompt dim)); the prompt dim is the projected one with `project`,
    as the official code (its `prompt_dim` is PROJECT when set)."""
    ph, pw = self.patch_size
    return math.sqrt(6.0 / (self.in_channels * ph * pw + (self.project or self.width)))

  @property
  def kv_bound(self) -> float:
    return math.sqrt(6.0 / (self.kv_length * (self.width // self.num_heads)))

  def setup(self):
    p, d, bound = self.length, self.width, self.init_bound
    dp = self.project or d
    rng = lambda: self.make_rng("params")
    var = lambda name, shape, init: self.variable("prompts", name, lambda: init(rng(), shape))
    n_sets = 1 if self.shared else len(self.layers)
    if not p:
      pass  # length 0: no prompts at all, the plain ViT.
    elif self.location == "prepend":
      self.tokens = var("tokens", (n_sets, p, dp), _uniform(bound))
    elif self.location == "add":
      self.tokens = var("tokens", (n_sets, self.num_prefix + self.num_patches, dp), _uniform(bound))
    elif self.location == "add-1":
      self.tokens = var("tokens", (n_sets, 1, dp), _uniform(bound))
    elif self.location == "prepend-pixel":
      ph, pw = self.patch_size
      self.pixels = var("pixels", (ph, pw * p, self.in_channels), _uniform(bound))
    elif self.location == "pad":
      h, w = self.image_size
      c = self.in_channels
      self.pad_top = var("pad_top", (p, w, c), _uniform(bound))
      self.pad_bottom = var("pad_bottom", (p, w, c), _uniform(bound))
      self.pad_left = var("pad_left", (h - 2 * p, p, c), _uniform(bound))
      self.pad_right = var("pad_right", (h - 2 * p, p, c), _uniform(bound))
    elif self.location == "concat-channel":
      h, w = self.image_size
      self.channels = var("channels", (h, w, p), _uniform(bound))
      # Zero kernel: training starts from the plain ViT, and both parts get gradients.
      self.channel_kernel = var("channel_kernel", (*self.patch_size, p, d),
                                lambda k, s: jnp.zeros(s, jnp.float32))
    if self.project and p:
      # kaiming-normal over fan-out, as the official projection layer; its bias keeps torch's
      # default Linear init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = dp.
      self.proj_kernel = var("proj_kernel", (dp, d),
                             lambda k, s: jax.random.normal(k, s) * math.sqrt(2.0 / d))
      self.proj_bias = var("proj_bias", (d,), _uniform(1.0 / math.sqrt(dp)))
    if self.kv_length:
      # (layers, heads, n, head_dim) as the official code; Kaiming-uniform over its fan-in
      # n * head_dim: U(-b, b), b = sqrt(6 / (n * head_dim)).
      shape = (len(self.kv_layers), self.num_heads, self.kv_length, d // self.num_heads)
      self.kv_keys = var("kv", shape, _uniform(self.kv_bound))
      if not self.kv_shared:
        self.kv_values = var("kv_values", shape, _uniform(self.kv_bound))
    if self.masks:
      ones = lambda k, shape: jnp.ones(shape, jnp.float32)
      self.token_mask = self.variable("prompt_masks", "token_mask", ones, None, (p,))
      self.segment_mask = self.variable("prompt_masks", "segment_mask", ones, None,
                                        (p, self.segments))
    self.drop = nn.Dropout(self.dropout)

  # -- helpers -----------------------------------------------------------------------------------

  def _prompt_set(self, layer: int, batch: int, train: bool) -> Array:
    """The (batch, n, d) prompts that layer `layer` receives (projected, masked, dropped out).

    batch=0: the (n, d) set shared by the batch (only without active dropout).
    """
    t = self.tokens.value[0 if self.shared else self.layers.index(layer)]
    t = prompt_values(
        t, projection=(self.proj_kernel.value, self.proj_bias.value) if self.project else None,
        masks=(self.token_mask.value, self.segment_mask.value) if self.masks else None)
    if not batch:
      return t
    t = jnp.broadcast_to(t, (batch,) + t.shape)
    return self.drop(t, deterministic=not train)

  def _pruned_keys(self, n: int) -> Optional[Array]:
    """The key mask of a sequence holding this module's n prompts (pruned ones masked off)."""
    if not self.masks or n != self.length:
      return None
    return jnp.concatenate([jnp.ones(self.num_prefix, bool), self.token_mask.value != 0,
                            jnp.ones(self.num_patches, bool)])

  def _extra_kv(self, layer: int):
    if not self.kv_length or layer not in self.kv_layers:
      return None
    i = self.kv_layers.index(layer)
    keys = jnp.swapaxes(self.kv_keys.value[i], 0, 1)  # (n, heads, head_dim)
    values = keys if self.kv_shared else jnp.swapaxes(self.kv_values.value[i], 0, 1)
    return keys, values

  # -- hooks -------------------------------------------------------------------------------------

  def embed(self, images, embedding, *, train):
    if self.location == "pad" and self.length:
      p = self.length
      b, h, w, c = images.shape
      inner = jax.image.resize(images, (b, h - 2 * p, w - 2 * p, c), "bilinear")
      bc = lambda v: jnp.broadcast_to(v.value, (b,) + v.value.shape).astype(images.dtype)
      middle = jnp.concatenate([bc(self.pad_left), inner, bc(self.pad_right)], axis=2)
      images = jnp.concatenate([bc(self.pad_top), middle, bc(self.pad_bottom)], axis=1)
      return embedding(images), None
    if self.location == "concat-channel" and self.length:
      extra = jax.lax.conv_general_dilated(
          self.channels.value[None], self.channel_kernel.value, self.patch_size, "VALID",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return embedding(images) + extra.astype(images.dtype), None
    if self.location == "prepend-pixel" and self.length:
      tokens = embedding(self.pixels.value[None].astype(images.dtype))  # (1, 1, p, d)
      tokens = jnp.broadcast_to(tokens.reshape(1, self.length, self.width),
                                (images.shape[0], self.length, self.width))
      return embedding(images), self.drop(tokens, deterministic=not train)
    return embedding(images), None

  def layer(self, layer, x, *, num_prompts, train):
    kv = self._extra_kv(layer)
    if not self.length or self.location in ("pad", "concat-channel"):
      return LayerInput(x, num_prompts, extra_kv=kv)
    if self.location in ("add", "add-1"):  # added to the tokens, none inserted
      if layer in self.layers:
        x = x + self._prompt_set(layer, x.shape[0], train)
      return LayerInput(x, num_prompts, extra_kv=kv)
    # The memory set is shared by the batch (projected once) unless dropout makes every
    # example's set different.
    batch = lambda memory: 0 if memory and not (train and self.dropout) else x.shape[0]
    tokens, n, memory = plan_lib.edit(
        self.plan.action(layer), x, prefix=self.num_prefix, carried=num_prompts,
        fresh=lambda memory: self._prompt_set(layer, batch(memory), train))
    mask = self._pruned_keys(n)
    if memory is not None and self.masks:
      mask = jnp.concatenate([jnp.ones(tokens.shape[1], bool), self.token_mask.value != 0])
    return LayerInput(tokens, n, memory=memory, extra_kv=kv, key_mask=mask)

  def after_encoder(self, x, *, num_prompts, train):
    n, k = num_prompts, self.num_prefix
    if self.pool == "original":
      return jnp.concatenate([x[:, :k], x[:, k + n:]], axis=1) if n else x
    if self.pool == "cls":
      return x
    if self.pool == "image":
      return x[:, k + n:]
    if self.pool == "prompt":
      return x[:, k:k + n]
    return x[:, k:]  # 'all'


def check_config(cfg: ml_collections.ConfigDict, model: VisionTransformer) -> None:
  utils.check_options(cfg, default_config(), "prompt")
  if cfg.length < 0:
    raise ValueError(f"config prompt.length={cfg.length} must be >= 0")
  if cfg.location not in LOCATIONS:
    raise ValueError(f"config prompt.location={cfg.location!r}: expected one of {LOCATIONS}")
  if cfg.pool not in POOLS:
    raise ValueError(f"config prompt.pool={cfg.pool!r}: expected one of {POOLS}")
  if cfg.pool == "cls" and not model.class_token:
    raise ValueError("config prompt.pool='cls' needs a backbone with a class token; this one pools "
                     f"with '{model.pool_type}' (use 'original', 'image', 'prompt' or 'all')")
  if cfg.location in PIXEL_LOCATIONS and cfg.deep:
    raise ValueError(f"config prompt.location={cfg.location!r} is a pixel-space (input) prompt; "
                     "it needs prompt.deep=False")
  if cfg.shared and not cfg.deep:
    raise ValueError("config prompt.shared=True (deep-shared) needs prompt.deep=True")
  if not 0.0 <= cfg.dropout < 1.0:
    raise ValueError(f"config prompt.dropout={cfg.dropout} must be in [0, 1)")
  if cfg.kv_length < 0:
    raise ValueError(f"config prompt.kv_length={cfg.kv_length} must be >= 0 (0 = no key-value "
                     "prompts)")
  if cfg.project < 0:
    raise ValueError(f"config prompt.project={cfg.project} must be >= 0 (0 = no projection)")
  if cfg.project and cfg.location not in ("prepend", "add", "add-1"):
    raise ValueError("config prompt.project applies to latent prompts (location prepend/add/add-1)")
  if cfg.location == "pad" and 2 * cfg.length >= min(model.image_size):
    raise ValueError(f"config prompt.length={cfg.length}: a pad this wide leaves no image inside "
                     f"{tuple(model.image_size)}")
  if cfg.masks or cfg.mask_file:
    if not (cfg.masks and cfg.location == "prepend" and cfg.length and not cfg.project):
      raise ValueError("config prompt.masks / prompt.mask_file (E2VPT pruning) need "
                       "prompt.masks=True, prompt.location='prepend', prompt.length > 0 and "
                       "prompt.project=0")
    if cfg.pool in ("prompt", "all"):
      raise ValueError(f"config prompt.pool={cfg.pool!r} reads prompt outputs, which pruning "
                       "removes; use 'original', 'cls' or 'image' with prompt.masks")
    if cfg.segments < 1 or model.width % cfg.segments:
      raise ValueError(f"config prompt.segments={cfg.segments} must divide the width "
                       f"{model.width}")
  prepends = cfg.location in ("prepend", "prepend-pixel")
  if cfg.pool in ("prompt", "all") and not (prepends and cfg.length):
    raise ValueError(f"config prompt.pool={cfg.pool!r} reads prompt outputs, but location "
                     f"{cfg.location!r} with length {cfg.length} puts no prompt tokens in the "
                     "sequence")
  if cfg.pool in ("prompt", "all") and not cfg.expand:
    layers = prompted_layers(model.depth, deep=cfg.deep, depth=cfg.depth, reverse=cfg.reverse)
    if max(layers) < model.depth - 1:
      raise ValueError(f"config prompt.pool={cfg.pool!r} reads prompt outputs, which "
                       "prompt.expand=False drops after the last prompted layer")


def make_plan(layers: Tuple[int, ...], depth: int, cfg: ml_collections.ConfigDict, *,
              fast_path: bool = True) -> plan_lib.PromptPlan:
  """The prompt plan of a config: fresh prompts at `layers`; pixel-patch prompts enter at
  layer 0 with the input; prompts outside the sequence ('add', pixel space) need none."""
  if not (cfg.location in ("prepend", "prepend-pixel") and cfg.length):
    return plan_lib.make(np.zeros((1, depth), bool), 0)
  if cfg.location == "prepend-pixel":
    return plan_lib.make(plan_lib.fresh_table((0,), depth), cfg.length, expand=cfg.expand,
                         fast_path=False, entry=cfg.length)
  return plan_lib.make(plan_lib.fresh_table(layers, depth), cfg.length, expand=cfg.expand,
                       reads_prompts=cfg.pool in ("prompt", "all"), fast_path=fast_path)


def kv_only_layers(layers: Tuple[int, ...], depth: int,
                   cfg: ml_collections.ConfigDict) -> Tuple[int, ...]:
  """The prompted layers whose prompt outputs are never read: the next layer replaces them
  (VPT-deep), drops them (no expand), or it is the last layer and the pooling ignores them.

  There the prompts need no query, attention output, residual or MLP, only their keys and values
  from the layer's frozen LayerNorm and projections: the exact fast path. Shallow prompts and
  first-k prompts flow on through later layers, so their last prompted layer is not in the set.
  """
  if cfg.location != "prepend":
    return ()
  return make_plan(layers, depth, cfg).memory_layers


def attach(model: VisionTransformer, cfg: ml_collections.ConfigDict) -> VisionTransformer:
  """`model` with VPT prompts plugged into its encoder (a clone; the original is unchanged)."""
  check_config(cfg, model)
  if model.hooks is not None:
    raise ValueError("this model already has encoder hooks attached")
  layers = prompted_layers(model.depth, deep=cfg.deep, depth=cfg.depth, reverse=cfg.reverse)
  hooks = VPT(plan=make_plan(layers, model.depth, cfg, fast_path=model.fast_path),
              length=cfg.length, layers=layers, width=model.width,
              patch_size=tuple(model.patch_size), image_size=tuple(model.image_size),
              in_channels=model.in_channels, num_prefix=int(model.class_token),
              num_patches=model.grid[0] * model.grid[1], shared=cfg.shared, expand=cfg.expand,
              kv_length=cfg.kv_length, kv_shared=cfg.kv_shared, num_heads=model.num_heads,
              kv_layers=tuple(range(model.depth)) if cfg.kv_deep else (0,),
              location=cfg.location, pool=cfg.pool, dropout=cfg.dropout, project=cfg.project,
              masks=cfg.masks, segments=cfg.segments,
              mask_digest=e2vpt.mask_digest(e2vpt.read_masks(cfg)) if cfg.mask_file else "")
  pool_type = {"original": model.pool_type, "cls": "token"}.get(cfg.pool, "gap")
  return model.clone(hooks=hooks, pool_type=pool_type)


def init_prompts(model: VisionTransformer, rng: Array) -> dict:
  """Fresh 'prompts' variables for a model made by `attach` (no backbone compute or memory)."""
  images = jnp.zeros((1, *model.image_size, model.in_channels), jnp.float32)
  # Under jit, everything but the prompts' initialisers is dead code and is never run.
  return jax.jit(lambda r: model.init(r, images).get("prompts", {}))(rng)


def init_from_array(prompts: dict, array: np.ndarray, *, source: str = "array") -> dict:
  """Replaces the initial prompt tokens by `array` ((p, d) for every layer, or (layers, p, d))."""
  tokens = prompts["hooks"].get("tokens")
  if tokens is None:
    raise ValueError("prompt init from an array needs latent prompts (location prepend/add/add-1)")
  array = np.asarray(array, np.float32)
  if array.shape == tokens.shape[1:]:
    array = np.broadcast_to(array, tokens.shape)
  if array.shape != tokens.shape:
    raise ValueError(f"{source}: prompt init array has shape {array.shape}; this model's prompts "
                     f"need {tuple(tokens.shape[1:])} or {tuple(tokens.shape)}")
  return {**prompts, "hooks": {**prompts["hooks"], "tokens": jax.device_put(array)}}


def load_init(prompts: dict, cfg: ml_collections.ConfigDict) -> dict:
  """Applies `cfg.init` ('uniform' keeps the random init; otherwise a .npy path)."""
  if cfg.init == "uniform":
    return prompts
  try:
    array = np.load(cfg.init)
  except (OSError, ValueError) as e:
    raise ValueError(f"config prompt.init={cfg.init!r}: cannot read a .npy array ({e})") from e
  return init_from_array(prompts, array, source=cfg.init)
