"""Semantic segmentation on a (prompted) ViT: feature maps, SETR-PUP heads and their loss.

The VPT paper (Table 3) transfers a frozen ImageNet-21k ViT-L/16 to ADE20K with SETR's progressive
upsampling head (SETR-PUP, Zheng et al. 2021). The facts below are read from mmsegmentation's
configs/_base_/models/setr_pup.py, configs/setr/setr_pup_512x512_160k_ade20k_bs_16.py (now
setr_vit-l_pup_8xb2-160k_ade20k-512x512.py), configs/_base_/datasets/ade20k.py,
configs/_base_/schedules/schedule_160k.py and mmseg/models/decode_heads/setr_up_head.py; no code is
taken from there.

* Backbone: ViT-L/16 at 512x512, outputs of blocks (9, 14, 19, 23) (0-based), no final LayerNorm
  (mmseg's `final_norm=False`), class token dropped, the patch tokens laid out as a (h/16, w/16)
  map. Here the block outputs are the ViT's sown `block_{i}` intermediates, laid out as [class
  token, prompts, patches]; the prompt rows of each block are counted from the hooks' static
  prompt plans (`prompt_rows`), never from sequence lengths, and the remaining length is checked,
  so neither the class token nor any prompt output reaches a feature map.
* SETRUPHead: LayerNorm (eps 1e-6) over the channels of its input tokens, then `num_convs` times
  [conv k x k (k=3, 'same' padding, no bias: mmcv's ConvModule drops it before a norm) -> SyncBN ->
  ReLU -> bilinear upsampling x up_scale, align_corners=False], then dropout and a 1x1 conv
  classifier (BaseDecodeHead.cls_seg).
  - decode head: block 23, channels 256, 4 convs, up_scale 2 (16x: back to the input size),
    dropout 0, loss weight 1.0;
  - ADE20K auxiliary heads (the ADE20K config's list replaces the base one): blocks 9, 14, 19,
    channels 256, 2 convs, up_scale 4 (SETRUPHead's default; 16x again), dropout 0, weight 0.4.
  The auxiliary heads only shape training; inference runs the decode head alone.
* Loss: cross-entropy with ignore index 255 on logits resized (bilinear, align_corners=False) to
  the label size; mmseg's CrossEntropyLoss (avg_non_ignore=False, the default in these configs)
  averages over ALL pixels, ignored ones counting zero (`average='all'`); 'valid' divides by the
  non-ignored pixels instead (PyTorch's own convention).

SyncBN is batch normalisation whose statistics are taken over the global batch (all devices), not
per device. Flax's BatchNorm reduces over every axis but the channels of the array it sees; under
`jax.jit` with the batch sharded across devices that array is the global batch, so the statistics
are already global (the compiler inserts the all-reduce), which is what SyncBN does. Statistics are
in the 'batch_stats' collection: batch statistics in training (and the running averages updated,
momentum 0.9 = PyTorch's 0.1, eps 1e-5 as PyTorch), running averages in evaluation. One
difference: flax averages the biased batch variance into the running variance, PyTorch the unbiased
one (a factor n / (n - 1), n = batch x height x width >= 16 x 32 x 32 in SETR: < 1e-4).

Resizing uses `jax.image.resize(..., antialias=False)`: half-pixel sampling with the edge sample
repeated, which is exactly PyTorch's bilinear interpolation with align_corners=False.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from vpt_jax.models.hooks import hook_parts
from vpt_jax.models.vit import LN_EPS, VisionTransformer

Array = jax.Array
Variables = Mapping[str, Any]

IGNORE_INDEX = 255
AVERAGES = ("all", "valid")


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """One SETR-PUP head: which block it reads and its size; `weight` is its loss weight."""

  layer: int
  channels: int = 256
  num_convs: int = 4
  up_scale: int = 2
  kernel_size: int = 3
  dropout: float = 0.0
  weight: float = 1.0


def setr_pup_specs(depth: int = 24) -> Tuple[HeadSpec, Tuple[HeadSpec, ...]]:
  """(decode head, auxiliary heads) of mmseg's SETR-PUP ADE20K config.

  For ViT-L (depth 24) these are blocks 23 and (9, 14, 19). Other depths (tiny test and demo
  models) read the blocks at the same relative depths: round((i + 1) * depth / 24) - 1.
  """
  if depth < 1:
    raise ValueError(f"depth must be positive, got {depth}")
  at = lambda i: max(round((i + 1) * depth / 24) - 1, 0)
  decode = HeadSpec(layer=at(23), channels=256, num_convs=4, up_scale=2, weight=1.0)
  aux = tuple(HeadSpec(layer=at(i), channels=256, num_convs=2, up_scale=4, weight=0.4)
              for i in (9, 14, 19))
  return decode, aux


def resize_bilinear(x: Array, size: Sequence[int]) -> Array:
  """(B, H, W, C) -> (B, size[0], size[1], C), PyTorch bilinear with align_corners=False."""
  size = (int(size[0]), int(size[1]))
  if tuple(x.shape[1:3]) == size:
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[3]), "bilinear", antialias=False)


class SETRUPHead(nn.Module):
  """LayerNorm -> num_convs x [conv -> BatchNorm -> ReLU -> bilinear x up_scale] -> 1x1 conv.

  Input (B, h, w, D) feature map, output (B, h * s^n, w * s^n, num_classes) logits.
  """

  num_classes: int
  channels: int = 256
  num_convs: int = 4
  up_scale: int = 2
  kernel_size: int = 3
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    if self.kernel_size not in (1, 3):
      raise ValueError(f"SETRUPHead kernel_size={self.kernel_size}: must be 1 or 3 (as mmseg)")
    x = nn.LayerNorm(epsilon=LN_EPS, name="norm")(x.astype(jnp.float32))
    pad = (self.kernel_size - 1) // 2
    for i in range(self.num_convs):
      x = nn.Conv(self.channels, (self.kernel_size, self.kernel_size),
                  padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                  name=f"conv_{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                       dtype=jnp.float32, name=f"bn_{i}")(x)
      x = nn.relu(x)
      b, h, w, c = x.shape
      x = resize_bilinear(x, (h * self.up_scale, w * self.up_scale))
    x = nn.Dropout(self.dropout)(x, deterministic=not train)
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="cls_seg")(x).astype(
        jnp.float32)


class SETRPUP(nn.Module):
  """The decode head and the auxiliary heads, each on its block's feature map.

  `features` maps block index -> (B, gh, gw, D). Returns (decode logits, auxiliary logits); the
  auxiliary heads run only when `with_aux` (default: in training).
  """

  num_classes: int
  decode: HeadSpec
  aux: Tuple[HeadSpec, ...] = ()
  dtype: Any = jnp.float32

  @property
  def layers(self) -> Tuple[int, ...]:
    """The blocks whose outputs the heads read."""
    return tuple(sorted({self.decode.layer, *(s.layer for s in self.aux)}))

  def _head(self, spec: HeadSpec, name: str) -> SETRUPHead:
    return SETRUPHead(self.num_classes, spec.channels, spec.num_convs, spec.up_scale,
                      spec.kernel_size, spec.dropout, self.dtype, name=name)

  @nn.compact
  def __call__(self, features: Mapping[int, Array], *, train: bool = False,
               with_aux: Optional[bool] = None) -> Tuple[Array, Tuple[Array, ...]]:
    missing = [i for i in self.layers if i not in features]
    if missing:
      raise ValueError(f"SETR-PUP heads read blocks {self.layers}; features lack {missing}")
    decode = self._head(self.decode, "decode_head")(features[self.decode.layer], train=train)
    if not (train if with_aux is None else with_aux):
      return decode, ()
    aux = tuple(self._head(s, f"auxiliary_head_{k}")(features[s.layer], train=train)
                for k, s in enumerate(self.aux))
    return decode, aux


def prompt_rows(model: VisionTransformer, layer: int) -> int:
  """Prompt rows (after the prefix) in the output of block `layer`: the sum over the hooks that
  carry a static prompt plan (VPT's `plan.output`); key/value-only prompts add no rows."""
  n = 0
  for part in hook_parts(model.hooks):
    plan = getattr(part, "plan", None)
    if plan is not None:
      n += plan.output(layer)
  return n


def patch_maps(backbone: VisionTransformer, variables: Variables, images: Array,
               layers: Sequence[int], *, train: bool = False,
               rngs: Optional[Dict[str, Array]] = None) -> Dict[int, Array]:
  """{block i: its patch-token outputs as a (B, gh, gw, D) map} for each i in `layers`.

  Runs `backbone` (plain or with hooks attached: VPT, E2VPT key-value prompts, ...) on `images`
  and reads the sown block outputs. Rows are counted explicitly: class token, then
  `prompt_rows(backbone, i)` prompts, then the gh*gw patches (a block whose length disagrees is an
  error). The class-token-only fast path of the last layer is switched off (every row is needed);
  the prompt fast path (prompts whose outputs nobody reads enter as keys/values only) stays on: it
  never touches patch rows.
  """
  bad = [i for i in layers if not 0 <= i < backbone.depth]
  if bad:
    raise ValueError(f"feature layers {bad} are outside the backbone's 0..{backbone.depth - 1}")
  model = backbone.clone(fast_path=False)
  gh, gw = grid_of(model, images)
  _, state = model.apply(variables, images, train=train, rngs=rngs or {},
                         mutable=["intermediates"])
  blocks = state["intermediates"]["Transformer"]
  out = {}
  for i in layers:
    x = blocks[f"block_{i}"][0]
    prefix = int(model.class_token) + prompt_rows(model, i)
    if x.shape[1] != prefix + gh * gw:
      raise ValueError(f"block {i} output has {x.shape[1]} rows; expected {prefix} (class token "
                       f"and prompts) + {gh}x{gw} patches")
    out[i] = x[:, prefix:].reshape(x.shape[0], gh, gw, x.shape[-1])
  return out


def grid_of(model: VisionTransformer, images: Array) -> Tuple[int, int]:
  """The patch grid of `images` (the model's own grid: inputs must be its image size)."""
  gh, gw = model.grid
  ph, pw = model.patch_size
  if tuple(images.shape[1:3]) != (gh * ph, gw * pw):
    raise ValueError(f"images of {tuple(images.shape[1:3])} pixels; the backbone runs at "
                     f"{(gh * ph, gw * pw)} (resample its position embedding for another size)")
  return gh, gw


@dataclasses.dataclass(frozen=True)
class Segmenter:
  """A backbone and SETR-PUP heads; their variables stay apart.

  `backbone_vars` is exactly what the classification path uses ({'params', 'prompts', ...} from
  `load_pretrained` / `init_prompts`), so checkpoints, prompts and the trainable-leaf rule carry
  over unchanged; `head_vars` is {'params', 'batch_stats'} of the heads.
  """

  backbone: VisionTransformer
  head: SETRPUP

  def init_head(self, rng: Array) -> Dict[str, Any]:
    """Fresh head variables (from abstract feature shapes: no backbone compute)."""
    gh, gw = self.backbone.grid
    feats = {i: jnp.zeros((1, gh, gw, self.backbone.width), jnp.float32) for i in self.head.layers}
    return jax.jit(lambda r: self.head.init(r, feats, train=False, with_aux=True))(rng)

  def apply(self, backbone_vars: Variables, head_vars: Variables, images: Array, *,
            train: bool = False, rngs: Optional[Dict[str, Array]] = None,
            with_aux: Optional[bool] = None):
    """(decode logits, aux logits), plus the updated 'batch_stats' when training.

    Training returns ((decode, aux), new_head_vars); evaluation returns (decode, aux).
    """
    rngs = rngs or {}
    feats = patch_maps(self.backbone, backbone_vars, images, self.head.layers, train=train,
                       rngs=rngs)
    if not train:
      return self.head.apply(head_vars, feats, train=False, with_aux=with_aux)
    out, state = self.head.apply(head_vars, feats, train=True, with_aux=with_aux, rngs=rngs,
                                 mutable=["batch_stats"])
    return out, {**head_vars, **state}


def cross_entropy(logits: Array, labels: Array, *, ignore_index: int = IGNORE_INDEX,
                  average: str = "all") -> Array:
  """Pixel cross-entropy of (B, h, w, C) logits against (B, H, W) integer labels.

  Logits are first resized to the label size (bilinear, align_corners=False). Pixels labelled
  `ignore_index` contribute zero; average 'all' divides by every pixel (mmseg's default),
  'valid' by the non-ignored ones (0 when there are none).
  """
  if average not in AVERAGES:
    raise ValueError(f"loss average={average!r}: expected one of {AVERAGES}")
  if labels.ndim != 3 or logits.ndim != 4 or labels.shape[0] != logits.shape[0]:
    raise ValueError(f"logits {tuple(logits.shape)} (B, h, w, C) and labels "
                     f"{tuple(labels.shape)} (B, H, W) do not match")
  logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
  valid = labels != ignore_index
  target = jnp.where(valid, labels, 0).astype(jnp.int32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  nll = jnp.where(valid, nll, 0.0)
  if average == "all":
    return nll.mean()
  return nll.sum() / jnp.maximum(valid.sum(), 1)


def segmentation_loss(decode: Array, aux: Sequence[Array], labels: Array, head: SETRPUP, *,
                      ignore_index: int = IGNORE_INDEX,
                      average: str = "all") -> Tuple[Array, Dict[str, Array]]:
  """decode.weight * CE(decode) + sum_k aux[k].weight * CE(aux_k); returns (total, parts)."""
  if aux and len(aux) != len(head.aux):
    raise ValueError(f"got {len(aux)} auxiliary outputs for {len(head.aux)} auxiliary heads")
  ce = lambda x: cross_entropy(x, labels, ignore_index=ignore_index, average=average)
  parts = {"decode": ce(decode)}
  total = head.decode.weight * parts["decode"]
  for k, (x, spec) in enumerate(zip(aux, head.aux)):
    parts[f"aux_{k}"] = ce(x)
    total = total + spec.weight * parts[f"aux_{k}"]
  return total, parts


def dense_backbone(model: VisionTransformer,
                   variables: Variables) -> Tuple[VisionTransformer, Dict[str, Any]]:
  """The backbone without its classifier (head, pre_logits, MAP pooling): what segmentation uses,
  so that 'full' and 'bias' do not count or train weights the feature maps never reach."""
  params = {k: v for k, v in dict(variables["params"]).items()
            if k not in ("head", "pre_logits", "MAPHead_0")}
  pool = "gap" if model.pool_type == "map" else model.pool_type
  model = model.clone(num_classes=None, representation_size=None, pool_type=pool)
  return model, {**variables, "params": params}
