"""The VPT paper's other transfer baselines as encoder hooks: MLP-k head, adapters, side-tuning.

Each is a `Hooks` method of one module, `TransferModules`, whose variables live in their own
collection 'modules' (paths `modules/hooks/...`), apart from the frozen checkpoint in 'params' and
the prompts in 'prompts'. Which parts exist follows the protocol's name
(`vpt_jax.tuning.rules.protocol`, the one registry of protocols), as does what trains.

* MLP-k (`modules/hooks/mlp/...`): k - 1 hidden layers Dense(h) -> ReLU -> norm -> Dropout on the
  head's input (`head_input`), then the model's own `params/head`. The official code normalises
  with BatchNorm1d; the default here is LayerNorm: it keeps the model stateless (no running
  statistics to update in the train step, checkpoint and thread through eval), makes a prediction
  independent of its batch (eval padding, cached features and multi-device splits cannot change
  it) and needs no train/eval switch. 'none' drops the norm.
* Adapter (`modules/hooks/adapter_{i}/...`): Pfeiffer-style, after each layer's FFN, before the
  residual add (`mlp_output`): y + up(gelu(down(y))), bottleneck width // reduction. The
  up-projection starts at zero, so the model starts as the backbone exactly; the down-projection
  starts random (LeCun normal). The official code zero-initialises both, which leaves every
  weight gradient of the down-projection zero forever (it passes through the zero up-projection,
  and the up-projection's through the zero down-projection output): a per-layer bias in effect.
* Side-tuning (`modules/hooks/side/...`): a small conv net on the image (3x3 stride-2 convs with
  ReLU, global average pool, Dense to the feature width) blended with the backbone's features by
  a learned gate a = sigmoid(alpha), alpha = 0 at the start: a * backbone + (1 - a) * side, as the
  official sidetune. It reads the images, so it cannot run on cached features.

Prompts and these modules attach together through `vpt_jax.models.hooks.ComposedHooks`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vpt_jax import utils
from vpt_jax.models.hooks import ComposedHooks, Hooks, hook_parts
from vpt_jax.models.vit import VisionTransformer

Array = jax.Array
COLLECTION = "modules"
NORMS = ("layernorm", "none")


def default_config() -> ml_collections.ConfigDict:
  """The `modules` section of a config: options of the baseline protocols' extra modules.

  Which modules exist follows `protocol` ('mlp-k', 'adapter', 'side'); these only shape them.
  mlp_hidden: width of the MLP-k hidden layers (0 = the feature width, as the official [d] * k).
  mlp_norm: 'layernorm' (default; stateless stand-in for the official BatchNorm) or 'none'.
  mlp_dropout: dropout after each hidden layer (official 0.1; training only).
  adapter_reduction: adapter bottleneck = width // adapter_reduction (official default 8).
  side_channels: channels of the side network's 3x3 stride-2 convs, one conv per entry.
  """
  return ml_collections.ConfigDict(dict(
      mlp_hidden=0, mlp_norm="layernorm", mlp_dropout=0.1, adapter_reduction=8,
      side_channels=(16, 32, 64)))


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Value checks of the `modules` section; errors name the option."""
  utils.check_options(cfg, default_config(), "modules")
  if cfg.mlp_hidden < 0:
    raise ValueError(f"config modules.mlp_hidden={cfg.mlp_hidden} must be >= 0 (0 = feature width)")
  if cfg.mlp_norm not in NORMS:
    raise ValueError(f"config modules.mlp_norm={cfg.mlp_norm!r}: expected one of {NORMS}")
  if not 0.0 <= cfg.mlp_dropout < 1.0:
    raise ValueError(f"config modules.mlp_dropout={cfg.mlp_dropout} must be in [0, 1)")
  if cfg.adapter_reduction < 1:
    raise ValueError(f"config modules.adapter_reduction={cfg.adapter_reduction} must be >= 1")
  channels = tuple(cfg.side_channels)
  if not channels or any(int(c) < 1 for c in channels):
    raise ValueError(f"config modules.side_channels={channels} must be a non-empty list of "
                     "positive channel counts")


# ------------------------------------------------------------------------------------------------
# Layers whose variables live in the 'modules' collection (flax's nn.Dense / nn.LayerNorm would
# put theirs in 'params', the frozen checkpoint's collection).


def _normal(std: float) -> Callable:
  return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def _zeros(key, shape) -> Array:
  del key
  return jnp.zeros(shape, jnp.float32)


class Linear(nn.Module):
  """x @ kernel + bias; kernel (in, out) from `kernel_init(key, shape)`, bias zeros."""

  features: int
  kernel_init: Optional[Callable] = None   # default LeCun normal: std 1/sqrt(fan_in)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    init = self.kernel_init or _normal(1.0 / math.sqrt(fan_in))
    kernel = self.variable(COLLECTION, "kernel",
                           lambda: init(self.make_rng("params"), (fan_in, self.features)))
    bias = self.variable(COLLECTION, "bias", lambda: jnp.zeros((self.features,), jnp.float32))
    return x @ kernel.value.astype(x.dtype) + bias.value.astype(x.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis (eps 1e-6 like the backbone), scale 1 and bias 0 at the start."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    d = x.shape[-1]
    scale = self.variable(COLLECTION, "scale", lambda: jnp.ones((d,), jnp.float32))
    bias = self.variable(COLLECTION, "bias", lambda: jnp.zeros((d,), jnp.float32))
    mu = x.mean(-1, keepdims=True)
    var = jnp.square(x - mu).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-6) * scale.value + bias.value


class Conv(nn.Module):
  """3x3 stride-2 'SAME' conv, NHWC / HWIO, He-normal kernel (it feeds a ReLU), zero bias."""

  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cin = x.shape[-1]
    kernel = self.variable(COLLECTION, "kernel", lambda: _normal(math.sqrt(2.0 / (9 * cin)))(
        self.make_rng("params"), (3, 3, cin, self.features)))
    bias = self.variable(COLLECTION, "bias", lambda: jnp.zeros((self.features,), jnp.float32))
    y = jax.lax.conv_general_dilated(x, kernel.value.astype(x.dtype), (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.value.astype(y.dtype)


class MlpHead(nn.Module):
  """`layers` x (Dense(hidden) -> ReLU -> norm -> Dropout); the final linear is params/head."""

  layers: int
  hidden: int
  norm: str = "layernorm"
  dropout: float = 0.1

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    for i in range(self.layers):
      x = nn.relu(Linear(self.hidden, kernel_init=_normal(math.sqrt(2.0 / x.shape[-1])),
                         name=f"dense_{i}")(x))
      if self.norm == "layernorm":
        x = LayerNorm(name=f"norm_{i}")(x)
      x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return x


class Adapter(nn.Module):
  """y + up(gelu(down(y))): identity at the start (up = 0), with a live down-projection."""

  bottleneck: int

  @nn.compact
  def __call__(self, y: Array) -> Array:
    h = nn.gelu(Linear(self.bottleneck, name="down")(y), approximate=True)
    return y + Linear(y.shape[-1], kernel_init=_zeros, name="up")(h)


class SideNetwork(nn.Module):
  """Strided convs -> ReLU -> global average pool -> Dense(features); gate alpha (scalar)."""

  channels: Tuple[int, ...]
  features: int

  @nn.compact
  def __call__(self, x: Array, images: Array) -> Array:
    s = images.astype(jnp.float32)
    for i, c in enumerate(self.channels):
      s = nn.relu(Conv(c, name=f"conv_{i}")(s))
    s = Linear(self.features, name="proj")(s.mean(axis=(1, 2)))
    alpha = self.variable(COLLECTION, "alpha", lambda: jnp.zeros((), jnp.float32))
    a = jax.nn.sigmoid(alpha.value)
    return a * x + (1.0 - a) * s.astype(x.dtype)


class TransferModules(Hooks):
  """The baselines' modules as hooks; build with `attach`, which fills in the model's sizes."""

  features: int                       # width of the head's input (width or representation_size)
  mlp_layers: int = 0                 # MLP-k: k - 1 hidden layers; 0 = no MLP head
  mlp_hidden: int = 0
  mlp_norm: str = "layernorm"
  mlp_dropout: float = 0.1
  adapter_layers: Tuple[int, ...] = ()
  adapter_bottleneck: int = 0
  side_channels: Tuple[int, ...] = ()  # empty = no side network

  def setup(self):
    if self.mlp_layers:
      self.mlp = MlpHead(self.mlp_layers, self.mlp_hidden or self.features, self.mlp_norm,
                         self.mlp_dropout)
    # A dict attribute names its modules adapter_{layer}.
    self.adapter = {i: Adapter(self.adapter_bottleneck) for i in self.adapter_layers}
    if self.side_channels:
      self.side = SideNetwork(tuple(self.side_channels), self.features)

  def mlp_output(self, layer, y, *, train):
    return self.adapter[layer](y) if layer in self.adapter_layers else y

  def head_input(self, x, images, *, train):
    if self.side_channels:
      if images is None:
        raise ValueError("side-tuning reads the images; it cannot run from cached features "
                         "(start_layer > 0)")
      x = self.side(x, images)
    if self.mlp_layers:
      x = self.mlp(x, train=train)
    return x


def find_modules(model: VisionTransformer) -> Optional[TransferModules]:
  return next((p for p in hook_parts(model.hooks) if isinstance(p, TransferModules)), None)


def attach(model: VisionTransformer, cfg: ml_collections.ConfigDict, *, mlp_layers: int = 0,
           adapter: bool = False, side: bool = False) -> VisionTransformer:
  """`model` with the requested modules added after any hooks it has (prompts stay first)."""
  check_config(cfg)
  if find_modules(model) is not None:
    raise ValueError("this model already has transfer modules attached")
  modules = TransferModules(
      features=model.representation_size or model.width, mlp_layers=mlp_layers,
      mlp_hidden=cfg.mlp_hidden, mlp_norm=cfg.mlp_norm, mlp_dropout=cfg.mlp_dropout,
      adapter_layers=tuple(range(model.depth)) if adapter else (),
      adapter_bottleneck=max(model.width // cfg.adapter_reduction, 1),
      side_channels=tuple(int(c) for c in cfg.side_channels) if side else ())
  hooks = modules if model.hooks is None else ComposedHooks(
      parts=(*hook_parts(model.hooks), modules))
  return model.clone(hooks=hooks)


def head_features(model: VisionTransformer) -> int:
  """Width of what the `head` Dense reads with the modules attached."""
  mods = find_modules(model)
  features = model.representation_size or model.width
  if mods is not None and mods.mlp_layers:
    return mods.mlp_hidden or features
  return features


def init_modules(model: VisionTransformer, rng: Array) -> dict:
  """Fresh 'modules' variables for a model made by `attach` (under jit the backbone is dead
  code)."""
  images = jnp.zeros((1, *model.image_size, model.in_channels), jnp.float32)
  return jax.jit(lambda r: model.init(r, images).get(COLLECTION, {}))(rng)
