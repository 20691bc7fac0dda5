"""From a config to a model, its variables, the trainable rule and a backbone fingerprint.

Everything a run needs is derived and checked here before any compute or data loading, so a bad
option (unknown key, impossible value, missing checkpoint) fails in a second with a message that
names it. The trainer and `load_tuned` both build through this one function.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections

from vpt_jax import checkpoints, partition, train
from vpt_jax.models import prompts
from vpt_jax.models.vit import VisionTransformer

_TOP_LEVEL = {"task", "group", "model", "prompt", "protocol", "trainable", "optim", "data", "batch_size", "seed",
              "eval_every_epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"}


@dataclasses.dataclass
class Built:
  model: VisionTransformer
  variables: Dict[str, Any]
  patterns: List[str]
  mask: Any
  backbone_file: str
  backbone_sha256: str

  def fingerprint(self) -> Dict[str, Any]:
    """What a saved trainable subtree is only valid with: backbone identity and model config."""
    m = self.model
    trainable, _ = partition.split(self.variables, self.mask)
    return {
        "backbone_sha256": self.backbone_sha256,
        "model": {k: _jsonable(getattr(m, k)) for k in (
            "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "num_classes",
            "pool_type", "class_token", "posemb_cls_row", "representation_size", "in_channels")},
        "prompt_hooks": None if m.hooks is None else {
            f.name: _jsonable(getattr(m.hooks, f.name)) for f in dataclasses.fields(m.hooks)
            if f.name not in ("parent", "name")},
        "trainable": {p: list(x.shape) for p, x in zip(partition.leaf_paths(trainable),
                                                         jax.tree.leaves(trainable))},
    }


def _jsonable(v: Any) -> Any:
  return json.loads(json.dumps(v, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def check_config(config: ml_collections.ConfigDict) -> None:
  """Value checks that need no model; unknown keys are caught by the locked ConfigDict."""
  unknown = sorted(set(config) - _TOP_LEVEL)
  if unknown:
    raise ValueError(f"unknown config option(s) {unknown}; known: {sorted(_TOP_LEVEL)}")
  if config.batch_size <= 0:
    raise ValueError(f"config batch_size={config.batch_size} must be > 0")
  if config.batch_size % jax.device_count():
    raise ValueError(f"config batch_size={config.batch_size} must be divisible by the "
                     f"{jax.device_count()} devices (the batch is split across them)")
  for key in ("eval_every_epochs", "checkpoint_every_steps"):
    if config[key] < 0:
      raise ValueError(f"config {key}={config[key]} must be >= 0")
  if config.log_every_steps <= 0:
    raise ValueError(f"config log_every_steps={config.log_every_steps} must be > 0")
  if config.keep_checkpoints < 1:
    raise ValueError(f"config keep_checkpoints={config.keep_checkpoints} must be >= 1")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config model.dtype={config.model.dtype!r}: 'float32' or 'bfloat16'")
  train.lr_schedule(config.optim, steps_per_epoch=1)  # checks lr / epochs / warmup
  if config.optim.name not in ("sgd", "adamw"):
    raise ValueError(f"config optim.name={config.optim.name!r}: expected 'sgd' or 'adamw'")


def build(config: ml_collections.ConfigDict, *, rng: Optional[jax.Array] = None) -> Built:
  """Loads the backbone, attaches prompts, initialises them and labels what trains.

  config.model.num_classes must be resolved (> 0) by then: the trainer sets it from the data.
  """
  check_config(config)
  mcfg = config.model
  num_classes = mcfg.num_classes
  if num_classes <= 0:
    raise ValueError(f"config model.num_classes={num_classes} must be > 0 (0 = from the data, "
                     "resolved by the trainer)")
  path, _ = checkpoints.resolve(mcfg.checkpoint)
  base, variables = checkpoints.load_pretrained(
      mcfg.checkpoint, image_size=mcfg.image_size or None, num_classes=num_classes,
      drop_pre_logits=mcfg.drop_pre_logits, dtype=jnp.dtype(mcfg.dtype))
  prompts.check_config(config.prompt, base)
  prompted = config.prompt.length or config.prompt.kv_length
  model = prompts.attach(base, config.prompt) if prompted else base
  if prompted:
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    variables = {**variables,
                 "prompts": prompts.load_init(prompts.init_prompts(model, rng), config.prompt)}
  patterns = list(config.trainable) or partition.protocol_patterns(config.protocol,
                                                                   depth=model.depth)
  mask = partition.label(variables, patterns)
  return Built(model=model, variables=variables, patterns=patterns, mask=mask,
               backbone_file=path, backbone_sha256=file_sha256(path))


def describe_difference(saved: Dict[str, Any], current: Dict[str, Any], prefix: str = "") -> List[str]:
  """Human-readable list of the keys whose values differ between two fingerprints."""
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k), current.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += describe_difference(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: saved {a!r}, now {b!r}")
  return out
