"""ConvNeXt and ResNet-50 v1.5 (torchvision) from their PyTorch checkpoints; VPT's pad prompt.

Both take NHWC images (already normalised the way the checkpoint expects: VPT uses ImageNet mean and
std) and return the backbone features, or logits when `num_classes` is set. Intermediates are sown
into 'intermediates' (`stem`, `stage1..4` / `layer1..4`, `pooled`, `features`).

Layout conversions from the PyTorch state dicts (`vpt_jax.weights.torch_convnets`), exact
(transposes only):
* conv kernels OIHW -> HWIO: `w.transpose(2, 3, 1, 0)`; a depthwise kernel (C, 1, k, k) becomes
  (k, k, 1, C), used with `feature_group_count=C`;
* Linear weights (out, in) -> Dense kernels (in, out): `w.T`;
* LayerNorm / BatchNorm weight -> `scale`; BatchNorm running_mean / running_var -> the
  'batch_stats' collection (`mean`, `var`). BatchNorm always uses these running statistics (the
  frozen, inference-mode BatchNorm of transfer learning); `num_batches_tracked` is ignored.

Numerics follow the originals: ConvNeXt LayerNorm eps 1e-6 (channels-first LayerNorm = LayerNorm
over the last NHWC axis), exact erf GELU, layer scale `gamma`, odd sizes floored by the 2x2 stride-2
downsampling convs; ResNet v1.5 (stride on the 3x3 conv of a bottleneck), BatchNorm eps 1e-5,
max-pool padding that never wins (-inf), no normalisation after the global average pool.

VPT's `pad` prompt lives here too (`PadPrompt`), because it belongs to these two backbones only (the
ViT prompt code has its own pad variant, which resizes the image; VPT's ConvNet pad does not).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


Array = jax.Array

# VPT's prompt_norm: torchvision Normalize with the ImageNet statistics (src/models/resnet.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PadPrompt(nn.Module):
  """VPT's `pad` prompt: a learnable border of `tokens` pixels around the S x S image.

  Variables (collection 'prompts'), NHWC versions of VPT's NCHW parameters:
    tb (1, 2T, S + 2T, C): top rows tb[:, :T] and bottom rows tb[:, T:], corners included
      (VPT `prompt_embeddings_tb` (1, C, 2T, S + 2T) transposed (0, 2, 3, 1));
    lr (1, S, 2T, C): left columns lr[:, :, :T] and right columns lr[:, :, T:] beside the image
      (VPT `prompt_embeddings_lr` (1, C, S, 2T)).
  With init 'random' (VPT's default) they start U(0, 1) and are mapped through the ImageNet
  normalisation at every call, as if they were [0, 1] pixels; with 'gaussian' they start N(0, 1)
  and are used as they are. The output is (B, S + 2T, S + 2T, C); nothing is resized.
  """

  tokens: int
  init: str = "random"

  @nn.compact
  def __call__(self, images: Array) -> Array:
    if self.init not in ("random", "gaussian"):
      raise ValueError(f"pad prompt init {self.init!r}: 'random' or 'gaussian'")
    b, h, w, c = images.shape
    t = self.tokens
    if h != w:
      raise ValueError(f"VPT's pad prompt needs square images, got {h}x{w}")
    if self.init == "random":
      init = lambda k, s: jax.random.uniform(k, s, jnp.float32)
    else:
      init = lambda k, s: jax.random.normal(k, s, jnp.float32)
    rng = lambda: self.make_rng("params")
    tb = self.variable("prompts", "tb", lambda: init(rng(), (1, 2 * t, h + 2 * t, c))).value
    lr = self.variable("prompts", "lr", lambda: init(rng(), (1, h, 2 * t, c))).value
    if tb.shape != (1, 2 * t, h + 2 * t, c) or lr.shape != (1, h, 2 * t, c):
      raise ValueError(f"pad prompts of shapes {tb.shape} / {lr.shape} fit another input size; "
                       f"these images are {h}x{w}x{c} (a pad prompt fits one size only)")
    if self.init == "random":
      mean = jnp.asarray(IMAGENET_MEAN[:c], jnp.float32)
      std = jnp.asarray(IMAGENET_STD[:c], jnp.float32)
      tb, lr = (tb - mean) / std, (lr - mean) / std
    tb, lr = tb.astype(images.dtype), lr.astype(images.dtype)
    bc = lambda v: jnp.broadcast_to(v, (b,) + v.shape[1:])
    x = jnp.concatenate([bc(lr[:, :, :t]), images, bc(lr[:, :, t:])], axis=2)
    return jnp.concatenate([bc(tb[:, :t]), x, bc(tb[:, t:])], axis=1)


def _prompt(module: nn.Module, images: Array) -> Array:
  """Applies the module's pad prompt (if any) and records the assembled input."""
  if module.pad_tokens:
    images = PadPrompt(module.pad_tokens, module.pad_init, name="pad_prompt")(images)
  module.sow("intermediates", "input", images)
  return images


def _head(module: nn.Module, features: Array) -> Array:
  module.sow("intermediates", "features", features)
  if module.num_classes:
    return nn.Dense(module.num_classes, kernel_init=nn.initializers.zeros, name="head")(features)
  return features


# ------------------------------------------------------------------------------------------------
# ConvNeXt.


def _ln(name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch's LayerNorm (stem activations can have a large mean).
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)


class ConvNeXtBlock(nn.Module):
  """dwconv 7x7 -> LayerNorm -> Linear 4C -> GELU(erf) -> Linear C -> * gamma, plus the input."""

  dim: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    y = nn.Conv(self.dim, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=self.dim,
                name="dwconv")(x)
    y = _ln("norm")(y)
    y = nn.Dense(4 * self.dim, name="pwconv1")(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dense(self.dim, name="pwconv2")(y)
    gamma = self.param("gamma", nn.initializers.constant(1e-6), (self.dim,))
    return x + y * gamma


class ConvNeXt(nn.Module):
  """ConvNeXt (Liu et al. 2022). ConvNeXt-B: depths (3, 3, 27, 3), dims (128, 256, 512, 1024).

  features = LayerNorm(mean over H, W of stage 4), the checkpoint's final `norm` (as VPT keeps it).
  """

  depths: Sequence[int] = (3, 3, 27, 3)
  dims: Sequence[int] = (128, 256, 512, 1024)
  num_classes: Optional[int] = None
  pad_tokens: int = 0            # VPT pad prompt width T (0: none)
  pad_init: str = "random"
  # The input size before the pad prompt (what the trainer's pipeline makes); informational,
  # any size runs.
  image_size: Optional[Tuple[int, int]] = None

  @property
  def depth(self) -> int:
    return int(sum(self.depths))

  @property
  def width(self) -> int:
    """Width of the features the head reads."""
    return int(self.dims[-1])

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    del train  # no dropout or drop-path at transfer time (VPT: drop_path_rate 0 for ConvNeXt)
    x = _prompt(self, images)
    x = nn.Conv(self.dims[0], (4, 4), strides=(4, 4), padding="VALID", name="stem_conv")(x)
    x = _ln("stem_norm")(x)
    self.sow("intermediates", "stem", x)
    for s, (depth, dim) in enumerate(zip(self.depths, self.dims)):
      if s:
        x = _ln(f"downsample{s}_norm")(x)
        x = nn.Conv(dim, (2, 2), strides=(2, 2), padding="VALID", name=f"downsample{s}_conv")(x)
      for j in range(depth):
        x = ConvNeXtBlock(dim, name=f"stage{s + 1}_{j}")(x)
      self.sow("intermediates", f"stage{s + 1}", x)
    x = jnp.mean(x, axis=(1, 2))
    self.sow("intermediates", "pooled", x)
    return _head(self, _ln("norm")(x))


# ------------------------------------------------------------------------------------------------
# ResNet (torchvision, v1.5).


def _bn(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride here: v1.5) -> 1x1 (4x planes), each with BatchNorm, plus the shortcut."""

  planes: int
  strides: int = 1
  downsample: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda f, k, s, p, name: nn.Conv(f, (k, k), strides=(s, s), padding=((p, p), (p, p)),
                                            use_bias=False, name=name)
    y = nn.relu(_bn("bn1")(conv(self.planes, 1, 1, 0, "conv1")(x)))
    y = nn.relu(_bn("bn2")(conv(self.planes, 3, self.strides, 1, "conv2")(y)))
    y = _bn("bn3")(conv(4 * self.planes, 1, 1, 0, "conv3")(y))
    if self.downsample:
      x = _bn("downsample_bn")(conv(4 * self.planes, 1, self.strides, 0, "downsample_conv")(x))
    return nn.relu(y + x)


class ResNet(nn.Module):
  """torchvision's Bottleneck ResNet; the defaults are ResNet-50. features = mean over H, W."""

  layers: Sequence[int] = (3, 4, 6, 3)
  stem_width: int = 64
  planes: Sequence[int] = (64, 128, 256, 512)
  num_classes: Optional[int] = None
  pad_tokens: int = 0
  pad_init: str = "random"
  image_size: Optional[Tuple[int, int]] = None   # as ConvNeXt.image_size

  @property
  def depth(self) -> int:
    return int(sum(self.layers))

  @property
  def width(self) -> int:
    return 4 * int(self.planes[-1])

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False) -> Array:
    del train  # BatchNorm is frozen: it always uses the running statistics
    x = _prompt(self, images)
    x = nn.Conv(self.stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
                use_bias=False, name="conv1")(x)
    x = nn.relu(_bn("bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    self.sow("intermediates", "stem", x)
    width = self.stem_width
    for l, (n, planes) in enumerate(zip(self.layers, self.planes)):
      for b in range(n):
        strides = 2 if (l and not b) else 1
        down = not b and (strides != 1 or width != 4 * planes)
        x = Bottleneck(planes, strides, down, name=f"layer{l + 1}_{b}")(x)
        width = 4 * planes
      self.sow("intermediates", f"layer{l + 1}", x)
    return _head(self, jnp.mean(x, axis=(1, 2)))
