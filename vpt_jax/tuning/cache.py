"""Cached frozen prefixes: run the layers before the first trainable part once per image.

When everything that trains (or that is not a fixed function of the image: prompts, adapters) sits
at or after encoder layer j, and the training preprocessing has no random augmentation (VTAB's
protocol), the token sequence entering layer j never changes during a run. It is computed once per
image (the sown intermediate 'block_{j-1}' of the model itself, hooks included, so the two paths
cannot disagree), and the train and eval steps enter the model at layer j
(`model.apply(v, tokens, start_layer=j)`). A linear probe or MLP-k head skips the whole encoder
(j = depth); partial-k and VPT in the last k layers skip depth - k layers.

`plan` derives j from the trainable mask and the attached hooks; j = 0 means nothing to cache
(trainable patch embedding, adapters or prompts in the first layer, a side network that reads the
images, backbone dropout, random augmentation).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import jax
import numpy as np

from vpt_jax import prompts
from vpt_jax.data.split import eval_order, train_order
from vpt_jax.models import heads
from vpt_jax.models.hooks import Hooks, hook_parts
from vpt_jax.models.vit import VisionTransformer
from vpt_jax.tuning import families, rules, steps

MODES = ("auto", "true", "false")
MAX_CACHE_BYTES = 8 << 30      # host memory the cached token sequences may take
_BLOCK = re.compile(r"params/Transformer/encoderblock_(\d+)/.*")
_AFTER_ENCODER = re.compile(
    r"params/(Transformer/encoder_norm|MAPHead_0|fc_norm|pre_logits|head)/.*")


def cache_mode(value: Any) -> str:
  """config.cache_features -> 'auto' | 'true' | 'false' (bools and strings accepted)."""
  text = str(value).lower()
  if text not in MODES:
    raise ValueError(f"config cache_features={value!r}: expected 'auto', True or False")
  return text


def _hooks_layer(hooks: Hooks, depth: int) -> Tuple[int, str]:
  """The first layer whose input one hook module changes (depth = none), and which part."""
  if isinstance(hooks, prompts.VPT):
    first = depth
    if hooks.length and hooks.location in prompts.PIXEL_LOCATIONS:
      return 0, f"pixel-space prompts ({hooks.location})"
    if hooks.length:
      first = min(hooks.layers)
    if hooks.kv_length:
      first = min(first, min(hooks.kv_layers))
    return first, "prompts"
  if isinstance(hooks, heads.TransferModules):
    if hooks.side_channels:
      return -1, "the side network reads the images"
    if hooks.adapter_layers:
      return min(hooks.adapter_layers), "adapters"
    return depth, "MLP head"
  return 0, f"unknown hooks {type(hooks).__name__}"


def entry_layer(model: VisionTransformer, mask: Any) -> Tuple[int, str]:
  """(j, why): the first encoder layer that depends on anything but the image and frozen weights.

  j = -1 when some part needs the images themselves (nothing can be cached); j = 0 when layer 0
  does (nothing to cache). The mask's trainable leaves and every hook (trainable or not: frozen
  prompts still change the sequence) count.
  """
  if families.family_of(model):
    return _pooled_entry(model, mask)
  j, why = model.depth, "everything trainable is after the encoder"
  flat_mask = dict(zip(rules.leaf_paths(mask), jax.tree.leaves(mask)))
  for path, trainable in flat_mask.items():
    if not trainable or not path.startswith("params/"):
      continue
    m = _BLOCK.fullmatch(path)
    layer = int(m.group(1)) if m else (model.depth if _AFTER_ENCODER.fullmatch(path) else 0)
    if layer < j:
      j, why = layer, f"trainable {path}"
  for part in hook_parts(model.hooks):
    layer, what = _hooks_layer(part, model.depth)
    if layer < j:
      j, why = layer, what
  return j, why


def _pooled_entry(model: Any, mask: Any) -> Tuple[int, str]:
  """Swin / ConvNeXt / ResNet: cached pooled features (the head's input) when only the head
  trains and no prompt changes the input; there is no cached entry inside these backbones."""
  if families.prompt_fingerprint(model) is not None:
    return 0, "prompts change what the backbone computes"
  for path, trainable in zip(rules.leaf_paths(mask), jax.tree.leaves(mask)):
    if trainable and not path.startswith("params/head/"):
      return 0, f"trainable {path}"
  return model.depth, "only the head trains: pooled features"


@dataclasses.dataclass(frozen=True)
class Plan:
  layer: int            # enter the model here; 0 = no caching
  reason: str


def plan(model: VisionTransformer, mask: Any, *, mode: str, deterministic: bool,
         num_examples: int = 0, process_count: int = 1) -> Plan:
  """Whether and where to cache. mode 'true' makes every obstacle an error naming it."""
  mode = cache_mode(mode)
  if mode == "false":
    return Plan(0, "off (config cache_features=False)")
  j, why = entry_layer(model, mask)
  family = families.family_of(model)
  seq = 1 if family else int(model.class_token) + model.grid[0] * model.grid[1]
  nbytes = num_examples * seq * model.width * 4
  obstacle = None
  if j <= 0:
    obstacle = f"layer 0 is not frozen ({why})" if j == 0 else f"not cacheable ({why})"
  elif getattr(model, "dropout", 0.0):
    obstacle = f"the backbone has dropout {model.dropout} in training"
  elif not deterministic:
    obstacle = "the training preprocessing has random augmentation (data.crop='resize_crop')"
  elif process_count > 1:
    obstacle = "cached features run on a single host"
  elif nbytes > MAX_CACHE_BYTES:
    obstacle = f"the token sequences would take {nbytes / 2**30:.1f} GiB"
  if obstacle is None:
    return Plan(j, f"enter at layer {j} ({why})")
  if mode == "true":
    raise ValueError(f"config cache_features=True, but {obstacle}")
  return Plan(0, f"not used: {obstacle}")


def prefix_fn(model: VisionTransformer, layer: int, microbatch: int = 0) -> Callable:
  """jitted (variables, images) -> the (batch, tokens, width) sequence entering `layer`.

  The model's own forward (hooks included) up to the sown 'block_{layer - 1}'; under jit the
  later layers are dead code and never run. `microbatch` > 0: in chunks of that many images, one
  after the other (`steps.map_in_chunks`; the trainer's `microbatch_size`).
  """
  def prefix(variables, images):
    _, state = model.apply(variables, images, mutable=["intermediates"])
    return state["intermediates"]["Transformer"][f"block_{layer - 1}"][0]
  return jax.jit(lambda v, x: steps.map_in_chunks(lambda c: prefix(v, c), x, microbatch))


def compute_tokens(fn: Callable, variables: Any, pipe) -> np.ndarray:
  """The token sequence of every example of `pipe`'s split, in split order (one pass)."""
  out = [np.asarray(fn(variables, batch["image"])) for batch in pipe.eval_batches()]
  return np.concatenate(out)[:len(pipe.split)]


@dataclasses.dataclass(frozen=True)
class EnterAt:
  """`model` entered at `layer`: apply(variables, tokens, ...) is the model on their images."""

  model: VisionTransformer
  layer: int

  def apply(self, variables, tokens, **kw):
    return self.model.apply(variables, tokens, start_layer=self.layer, **kw)


class TokenPipeline:
  """A `Pipeline`'s batches, in its exact order, with each image replaced by its cached tokens."""

  def __init__(self, pipe, tokens: np.ndarray):
    if pipe.local != pipe.batch_size:
      raise ValueError("cached features run on a single host")
    self.pipe = pipe
    self.tokens = tokens
    self.labels = np.asarray(pipe.split.labels, np.int32)

  @property
  def steps_per_epoch(self) -> int:
    return self.pipe.steps_per_epoch

  def _batch(self, index: np.ndarray) -> Dict[str, np.ndarray]:
    return {"image": self.tokens[index], "label": self.labels[index]}

  def train_batches(self, start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    """Same (seed, epoch) permutations and step -> batch map as `Pipeline.train_batches`."""
    spe, b = self.steps_per_epoch, self.pipe.batch_size
    epoch, skip = divmod(start_step, spe)
    while True:
      order, mask = train_order(self.pipe.epoch_order(epoch), b)
      for s in range(skip, spe):
        yield {**self._batch(order[s * b:(s + 1) * b]), "mask": mask[s * b:(s + 1) * b]}
      epoch, skip = epoch + 1, 0

  def eval_batches(self) -> Iterator[Dict[str, np.ndarray]]:
    b = self.pipe.batch_size
    index, mask = eval_order(len(self.tokens), b)
    for s in range(0, len(index), b):
      yield {**self._batch(index[s:s + b]), "mask": mask[s:s + b]}


@dataclasses.dataclass(frozen=True)
class HeadOnly:
  """A Swin / ConvNet entered after its pooling: apply(variables, features) is its head (the
  model's own `params/head` Dense, computed as flax's Dense does)."""

  model: Any
  layer: int

  def apply(self, variables, features, **kw):
    del kw  # train / rngs: nothing random after the pooling
    head = variables["params"]["head"]
    return jax.numpy.dot(features, head["kernel"]) + head["bias"]


def pooled_fn(model: Any) -> Callable:
  """jitted (variables, images) -> the (batch, width) features a Swin / ConvNet's head reads."""
  name = "pooled" if families.family_of(model) == "swin" else "features"

  def fn(variables, images):
    _, state = model.apply(variables, images, mutable=["intermediates"])
    return state["intermediates"][name][0]
  return jax.jit(fn)


def cache_pipelines(model: VisionTransformer, layer: int, variables: Mapping[str, Any],
                    pipes: Mapping[str, Any], microbatch: int = 0
                    ) -> Tuple[EnterAt, Dict[str, TokenPipeline], float]:
  """(the model entered at `layer`, each pipeline over cached tokens, bytes cached)."""
  other = bool(families.family_of(model))
  fn = pooled_fn(model) if other else prefix_fn(model, layer, microbatch)
  out = {name: TokenPipeline(p, compute_tokens(fn, variables, p)) for name, p in pipes.items()}
  entered = HeadOnly(model, layer) if other else EnterAt(model, layer)
  return entered, out, float(sum(p.tokens.nbytes for p in out.values()))


def describe(p: Plan, depth: int, extra: Optional[str] = None) -> str:
  """The progress line about the cached path."""
  if not p.layer:
    return f"cached features: {p.reason}"
  return (f"cached features: layers 0..{p.layer - 1} of {depth} run once per image; training "
          f"and evaluation {p.reason}" + (f"; {extra}" if extra else ""))
