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

from vpt_jax import checkpoints, features, partition, train
from vpt_jax.models import heads, prompts
from vpt_jax.models.vit import VisionTransformer

_TOP_LEVEL = {"task", "group", "prune", "model", "prompt", "protocol", "trainable", "optim", "data", "batch_size", "seed",
              "eval_every_epochs", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
              "modules", "cache_features"}


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
    module_hooks = heads.find_modules(m)
    prompt_hooks = next((h for h in heads.hook_parts(m) if h is not module_hooks), None)
    return {
        "backbone_sha256": self.backbone_sha256,
        "model": {k: _jsonable(getattr(m, k)) for k in (
            "image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "num_classes",
            "pool_type", "class_token", "posemb_cls_row", "representation_size", "in_channels")},
        "prompt_hooks": _hook_fields(prompt_hooks),
        "trainable": {p: list(x.shape) for p, x in zip(partition.leaf_paths(trainable),
                                                         jax.tree.leaves(trainable))},
    } | ({} if module_hooks is None else {"module_hooks": _hook_fields(module_hooks)})


def _hook_fields(hooks: Any) -> Optional[Dict[str, Any]]:
  if hooks is None:
    return None
  return {f.name: _jsonable(getattr(hooks, f.name)) for f in dataclasses.fields(hooks)
          if f.name not in ("parent", "name")}


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
  if "modules" in config:
    heads.check_config(config.modules)
  heads.protocol_modules(config.protocol)  # checks mlp-k's k
  if "cache_features" in config:
    features.cache_mode(config.cache_features)


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
  base = base.clone(fast_path=mcfg.fast_path)  # read by prompts.attach too
  prompts.check_config(config.prompt, base)
  prompted = config.prompt.length or config.prompt.kv_length
  model = prompts.attach(base, config.prompt) if prompted else base
  if prompted:
    seed = config.seed if config.prompt.init_seed < 0 else config.prompt.init_seed
    rng = jax.random.PRNGKey(seed) if rng is None else rng
    variables = {**variables,
                 "prompts": prompts.load_init(prompts.init_prompts(model, rng), config.prompt),
                 **prompts.init_masks(model)}
    variables = prompts.load_masks(variables, config.prompt)
  model, variables = _attach_modules(config, model, variables, rng)
  patterns = trainable_patterns(config, model)
  mask = partition.label(variables, patterns)
  return Built(model=model, variables=variables, patterns=patterns, mask=mask,
               backbone_file=path, backbone_sha256=file_sha256(path))


def trainable_patterns(config: ml_collections.ConfigDict, model: VisionTransformer) -> List[str]:
  """The run's trainable rule: `config.trainable` if given, else its protocol's patterns."""
  return list(config.trainable) or partition.protocol_patterns(config.protocol, depth=model.depth)


def _attach_modules(config: ml_collections.ConfigDict, model: VisionTransformer,
                    variables: Dict[str, Any], rng: Optional[jax.Array]):
  """Adds the protocol's extra modules (MLP-k head, adapters, side network) and their variables.

  Their own key (fold 1 of the run's) keeps the prompts' initial values independent of them.
  """
  spec = heads.protocol_modules(config.protocol)
  if not spec:
    return model, variables
  cfg = config.modules if "modules" in config else heads.default_config()
  model = heads.attach(model, cfg, **spec)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  variables = {**variables, heads.COLLECTION: heads.init_modules(model, jax.random.fold_in(rng, 1))}
  head = variables["params"]["head"]
  width = heads.head_features(model)
  if head["kernel"].shape[0] != width:  # an MLP head of another width: a fresh zero head reads it
    n = head["kernel"].shape[-1]
    params = {**variables["params"], "head": {"kernel": jnp.zeros((width, n), jnp.float32),
                                              "bias": jnp.zeros((n,), jnp.float32)}}
    variables = {**variables, "params": params}
  return model, variables


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
