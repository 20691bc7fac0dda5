"""From a config to a model, its variables, the trainable rule and a backbone fingerprint.

Everything a run needs is derived and checked here before any compute or data loading, so a bad
option (unknown key, impossible value, missing checkpoint) fails in a second with a message that
names it. The training loop and `load_tuned` both build through this one function.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections

from vpt_jax import prompts, utils
from vpt_jax.models import heads
from vpt_jax.models.hooks import hook_parts
from vpt_jax.models.vit import REMAT, VisionTransformer
from vpt_jax.tuning import cache, families, head_init, memory, optim, rules
from vpt_jax.weights import backbones, download

_TOP_LEVEL = {"task", "group", "prune", "model", "prompt", "protocol", "trainable", "optim", "data",
              "batch_size", "seed", "eval_every_epochs", "log_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "modules", "cache_features",
              "seg", "microbatch_size"}
# Model fields that determine the parameters and their function (not execution choices such as
# `fast_path`, `dtype` or `remat`).
ARCHITECTURE = ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_dim", "num_classes",
                "pool_type", "class_token", "posemb_cls_row", "representation_size", "in_channels")
# Architecture fields added later (PyTorch ViTs): in a fingerprint only when they differ from the
# default, so the fingerprints of workdirs written before them stay valid.
ARCHITECTURE_OPTIONAL = {"approximate_gelu": True, "fc_norm": False}
# Data options that change what the model sees for an image.
PREPROCESSING = ("crop", "normalization", "resize_size")
# Hook fields derived from the options and the execution choices (the prompt plan with its fast
# path): not part of a fingerprint.
_DERIVED_HOOK_FIELDS = ("parent", "name", "plan")
FINGERPRINT_VERSION = 2


@dataclasses.dataclass
class Built:
  model: VisionTransformer
  variables: Dict[str, Any]
  patterns: List[str]
  mask: Any
  backbone_file: str
  backbone_sha256: str
  preprocessing: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def fingerprint(self) -> Dict[str, Any]:
    """What a saved trainable subtree is only valid with: the backbone file, the architecture,
    the prompt and module options, the preprocessing and the trainable leaves' shapes.

    Only what determines the parameters and the function they compute: toggling an execution
    choice (`model.fast_path`, `model.dtype`, cached features) keeps a workdir loadable.
    """
    m = self.model
    trainable, _ = rules.split(self.variables, self.mask)
    if families.family_of(m):  # Swin / ConvNeXt / ResNet: the family names the architecture
      return {
          "version": FINGERPRINT_VERSION,
          "backbone_sha256": self.backbone_sha256,
          "model": families.model_fingerprint(m),
          "prompt_hooks": families.prompt_fingerprint(m),
          "preprocessing": utils.jsonable(self.preprocessing),
          "trainable": {p: list(x.shape) for p, x in zip(rules.leaf_paths(trainable),
                                                         jax.tree.leaves(trainable))},
      }
    module_hooks = heads.find_modules(m)
    prompt_hooks = next((h for h in hook_parts(m.hooks) if h is not module_hooks), None)
    return {
        "version": FINGERPRINT_VERSION,
        "backbone_sha256": self.backbone_sha256,
        "model": {k: utils.jsonable(getattr(m, k)) for k in ARCHITECTURE}
                 | {k: getattr(m, k) for k, default in ARCHITECTURE_OPTIONAL.items()
                    if getattr(m, k, default) != default},
        "prompt_hooks": _hook_fields(prompt_hooks),
        "preprocessing": utils.jsonable(self.preprocessing),
        "trainable": {p: list(x.shape) for p, x in zip(rules.leaf_paths(trainable),
                                                       jax.tree.leaves(trainable))},
    } | ({} if module_hooks is None else {"module_hooks": _hook_fields(module_hooks)})


def activation_bytes_per_row(config: ml_collections.ConfigDict, model: Any) -> Optional[int]:
  """A ViT layer's largest activation for one image (MLP hidden, q/k/v or attention weights), in
  float32 bytes: what `microbatch_size=0` sizes CPU chunks by. None for the other families."""
  if families.family_of(model):
    return None
  grid = (model.image_size[0] // model.patch_size[0]) * (model.image_size[1] // model.patch_size[1])
  tokens = grid + int(model.class_token) + config.prompt.length
  keys = tokens + config.prompt.kv_length
  return 4 * max(tokens * model.mlp_dim, 3 * tokens * model.width, model.num_heads * tokens * keys)


def _hook_fields(hooks: Any) -> Optional[Dict[str, Any]]:
  if hooks is None:
    return None
  return {f.name: utils.jsonable(getattr(hooks, f.name)) for f in dataclasses.fields(hooks)
          if f.name not in _DERIVED_HOOK_FIELDS}


def comparable(saved: Dict[str, Any], current: Dict[str, Any]
               ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(saved, current) fingerprints in one format, to compare.

  A fingerprint without 'version' was written by vpt_jax 0.1.0: it lacks the preprocessing and
  holds the derived `kv_only_layers` among the prompt fields (which is why toggling
  `model.fast_path` made such a workdir unloadable). Both drop what the old format lacks or
  should not have had, so an old workdir restores onto the same options.
  """
  if "version" in saved:
    return saved, current
  old = json.loads(json.dumps(saved))
  if old.get("prompt_hooks"):
    old["prompt_hooks"].pop("kv_only_layers", None)
  now = {k: v for k, v in current.items() if k not in ("version", "preprocessing")}
  return old, now


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
  if config.get("microbatch_size", 0) < 0:
    raise ValueError(f"config microbatch_size={config.microbatch_size} must be >= 0 "
                     "(0: automatic)")
  if config.log_every_steps <= 0:
    raise ValueError(f"config log_every_steps={config.log_every_steps} must be > 0")
  if config.keep_checkpoints < 1:
    raise ValueError(f"config keep_checkpoints={config.keep_checkpoints} must be >= 1")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config model.dtype={config.model.dtype!r}: 'float32' or 'bfloat16'")
  if config.model.get("remat", "none") not in REMAT:
    raise ValueError(f"config model.remat={config.model.remat!r}: one of {REMAT}")
  memory.check(config.model.get("frozen_dtype", "float32"),
               config.model.get("frozen_sharding", "replicated"))
  optim.lr_schedule(config.optim, steps_per_epoch=1)  # checks lr / epochs / warmup
  if config.optim.name not in ("sgd", "adamw"):
    raise ValueError(f"config optim.name={config.optim.name!r}: expected 'sgd' or 'adamw'")
  if "modules" in config:
    heads.check_config(config.modules)
  rules.protocol_modules(config.protocol)  # checks the protocol's name (and mlp-k's k)
  if "cache_features" in config:
    cache.cache_mode(config.cache_features)
  head_init.check(config.model.get("head_init", "zeros"))
  family = families.known_family(config.model)
  if family in families.FAMILIES:  # otherwise checked once `build` has read the file's family
    families.check_config(config, family)


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
  path, _ = download.resolve(mcfg.checkpoint)
  family, base, variables = backbones.load_any(
      mcfg.checkpoint, family=mcfg.get("family", "auto"), num_heads=mcfg.get("num_heads", 0),
      image_size=mcfg.image_size or None, num_classes=num_classes,
      drop_pre_logits=mcfg.drop_pre_logits, dtype=jnp.dtype(mcfg.dtype))
  if family in families.FAMILIES:
    if mcfg.get("remat", "none") != "none":
      raise ValueError(f"config model.remat={mcfg.remat!r}: the {family} backbone has no remat "
                       "option (ViTs have)")
    return _build_other(config, family, base, variables, path, rng)
  base = base.clone(fast_path=mcfg.fast_path)  # read by prompts.attach too
  if mcfg.get("remat", "none") != "none":
    if not hasattr(base, "remat"):
      raise ValueError(f"config model.remat={mcfg.remat!r}: the {type(base).__name__} backbone "
                       "has no remat option (ViTs have)")
    base = base.clone(remat=mcfg.remat)
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
  variables = _init_head(config, variables)
  patterns = trainable_patterns(config, model)
  mask = rules.label(variables, patterns)
  return Built(model=model, variables=variables, patterns=patterns, mask=mask,
               backbone_file=path, backbone_sha256=download.file_sha256(path),
               preprocessing=preprocessing_spec(config))


def _build_other(config: ml_collections.ConfigDict, family: str, base: Any,
                 variables: Dict[str, Any], path: str, rng: Optional[jax.Array]) -> Built:
  """`build` for Swin, ConvNeXt and ResNet (`vpt_jax.tuning.families`)."""
  families.check_config(config, family)
  if family == "swin":
    base = base.clone(fast_path=config.model.fast_path)
  seed = config.seed if config.prompt.init_seed < 0 else config.prompt.init_seed
  rng = jax.random.PRNGKey(seed) if rng is None else rng
  model, variables = families.attach_prompts(config, family, base, variables, rng)
  variables = _init_head(config, variables)
  patterns = trainable_patterns(config, model)
  return Built(model=model, variables=variables, patterns=patterns,
               mask=rules.label(variables, patterns), backbone_file=path,
               backbone_sha256=download.file_sha256(path),
               preprocessing=preprocessing_spec(config))


def preprocessing_spec(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """What the run's preprocessing turns an image into the model input with (in the fingerprint,
  applied by predict and serving). `pixel_scale` only when it is not 1, so fingerprints written
  before it existed stay valid."""
  if "data" not in config:
    return {}
  spec = {k: config.data[k] for k in PREPROCESSING if k in config.data}
  if config.data.get("pixel_scale", 1) != 1:
    spec["pixel_scale"] = config.data.pixel_scale
  return spec


def _init_head(config: ml_collections.ConfigDict, variables: Dict[str, Any]) -> Dict[str, Any]:
  """The fresh head by `model.head_init` (configs without it, e.g. old workdirs: zeros), from its
  own key (fold 2 of the run's seed), so prompts and modules keep their initial values."""
  kind = config.model.get("head_init", "zeros")
  if kind == "zeros":
    return variables
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
  head = head_init.init_head(kind, variables["params"]["head"], rng)
  return {**variables, "params": {**variables["params"], "head": head}}


def trainable_patterns(config: ml_collections.ConfigDict, model: VisionTransformer) -> List[str]:
  """The run's trainable rule: `config.trainable` if given, else its protocol's patterns."""
  if list(config.trainable):
    return list(config.trainable)
  if families.family_of(model):
    return families.protocol_patterns(config.protocol, model)
  return rules.protocol_patterns(config.protocol, depth=model.depth)


def _attach_modules(config: ml_collections.ConfigDict, model: VisionTransformer,
                    variables: Dict[str, Any], rng: Optional[jax.Array]):
  """Adds the protocol's extra modules (MLP-k head, adapters, side network) and their variables.

  Their own key (fold 1 of the run's) keeps the prompts' initial values independent of them.
  """
  spec = rules.protocol_modules(config.protocol)
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


def describe_difference(saved: Dict[str, Any], current: Dict[str, Any],
                        prefix: str = "") -> List[str]:
  """Human-readable list of the keys whose values differ between two fingerprints."""
  out = []
  for k in sorted(set(saved) | set(current)):
    a, b = saved.get(k), current.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += describe_difference(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: saved {a!r}, now {b!r}")
  return out
