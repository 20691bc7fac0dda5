"""The one rule that decides what trains: regexes over variable paths.

A leaf's path is its collection and module path joined by '/', e.g.
`params/Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel` or `prompts/hooks/tokens`. A leaf is
trainable when any pattern of the rule matches its whole path; everything else is frozen. Every
protocol (VPT, linear probe, full fine-tuning, bias, partial-k, and the extra modules of adapters,
MLP heads and side networks) is just a different list of patterns, so there is one code path.

`split` cuts the variables into (trainable, frozen) trees. The train step differentiates the first
and passes the second as a plain input, so no gradient is ever formed for a frozen weight, and the
optimizer only ever sees the trainable tree.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np
from flax import traverse_util

Tree = Dict[str, Any]

_HEAD = r"params/head/.*"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A named tuning protocol: which leaves train, and which extra modules the builder attaches.

  modules: keyword arguments of `vpt_jax.models.heads.attach` ({} = none): mlp_layers (MLP-k's
  k - 1 hidden layers), adapter, side.
  """

  name: str
  patterns: Tuple[str, ...]
  modules: Mapping[str, Any] = dataclasses.field(default_factory=dict)


_PROTOCOLS = {
    "vpt": ((r"prompts/.*", _HEAD), {}),
    "linear": ((_HEAD,), {}),
    "full": ((r".*",), {}),
    "bias": ((r"params/.*/bias", _HEAD), {}),
    "vpt+bias": ((r"prompts/.*", r"params/.*/bias", _HEAD), {}),
    "adapter": ((r"modules/hooks/adapter_\d+/.*", _HEAD), {"adapter": True}),
    "side": ((r"modules/hooks/side/.*", _HEAD), {"side": True}),
}


def protocol(name: str, *, depth: Optional[int] = None) -> Protocol:
  """The one registry of protocols (every name is parsed here, mlp-k and partial-k included).

  vpt: prompts + head. linear: head. full: everything. bias: every bias (BitFit, LayerNorm biases
  included) + head. partial-k (e.g. 'partial-2'): the last k blocks, the final norm and the head.
  vpt+bias: prompts, every bias and the head (the paper's Table 3).
  The baselines whose extra modules live in the 'modules' collection (`vpt_jax.models.heads`):
  mlp-k (k >= 2: the k - 1 hidden layers + head), adapter (every layer's adapter + head), side
  (side network and its gate + head).
  """
  if name in _PROTOCOLS:
    patterns, modules = _PROTOCOLS[name]
    return Protocol(name, patterns, modules)
  m = re.fullmatch(r"mlp-(\d+)", name)
  if m:
    k = int(m.group(1))
    if k < 2:
      raise ValueError(f"protocol {name!r}: MLP-k needs k >= 2 (k = 1 is protocol 'linear')")
    return Protocol(name, (r"modules/hooks/mlp/.*", _HEAD), {"mlp_layers": k - 1})
  m = re.fullmatch(r"partial-(\d+)", name)
  if m:
    k = int(m.group(1))
    if depth is None or not 0 < k <= depth:
      raise ValueError(f"protocol {name!r} needs 1 <= k <= depth ({depth})")
    blocks = "|".join(str(i) for i in range(depth - k, depth))
    return Protocol(name, (rf"params/Transformer/encoderblock_({blocks})/.*",
                           r"params/(Transformer/encoder_norm|fc_norm)/.*", _HEAD))
  raise ValueError(f"unknown protocol {name!r}; expected vpt, linear, full, bias, vpt+bias, "
                   "partial-k, mlp-k, adapter or side")


def protocol_patterns(name: str, *, depth: Optional[int] = None) -> List[str]:
  """The trainable-path patterns of a named protocol (see `protocol`)."""
  return list(protocol(name, depth=depth).patterns)


def protocol_modules(name: str) -> Dict[str, Any]:
  """Which modules a protocol attaches: {} for the protocols that need none."""
  if name.startswith("partial-"):
    return {}
  return dict(protocol(name).modules)


def leaf_paths(variables: Mapping[str, Any]) -> List[str]:
  """'/'-joined paths in `jax.tree.leaves` order, so they zip with the leaves."""
  flat, _ = jax.tree_util.tree_flatten_with_path(dict(variables))
  return ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in flat]


def label(variables: Mapping[str, Any], patterns: Sequence[str], *,
          require_all_used: bool = True) -> Tree:
  """A tree of bools with the structure of `variables`: True where a pattern matches the path.

  A pattern that matches no leaf is an error (a typo would otherwise silently freeze something).
  """
  compiled = []
  for p in patterns:
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"trainable pattern {p!r} is not a valid regex ({e})") from e
  flat = traverse_util.flatten_dict(dict(variables))
  used = [False] * len(compiled)
  mask = {}
  for path in flat:
    name = "/".join(path)
    hits = [i for i, c in enumerate(compiled) if c.fullmatch(name)]
    for i in hits:
      used[i] = True
    mask[path] = bool(hits)
  if require_all_used:
    unused = [p for p, u in zip(patterns, used) if not u]
    if unused:
      raise ValueError(f"trainable pattern(s) {unused} match no variable; paths look like "
                       f"{', '.join(sorted(leaf_paths(variables))[:3])}, ...")
  return traverse_util.unflatten_dict(mask)


def split(variables: Mapping[str, Any], mask: Tree) -> Tuple[Tree, Tree]:
  """(trainable, frozen): two disjoint trees holding the leaves that `mask` marks True / False."""
  flat = traverse_util.flatten_dict(dict(variables))
  flat_mask = traverse_util.flatten_dict(mask)
  if set(flat) != set(flat_mask):
    raise ValueError("mask and variables have different leaves")
  train = {k: v for k, v in flat.items() if flat_mask[k]}
  frozen = {k: v for k, v in flat.items() if not flat_mask[k]}
  return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> Tree:
  """The inverse of `split`."""
  flat = dict(traverse_util.flatten_dict(dict(frozen)))
  for k, v in traverse_util.flatten_dict(dict(trainable)).items():
    if k in flat:
      raise ValueError(f"leaf {'/'.join(k)} is both trainable and frozen")
    flat[k] = v
  return traverse_util.unflatten_dict(flat)


def count(tree: Any) -> int:
  """Number of scalars in a tree (shapes only; works on abstract trees too)."""
  return int(sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree)))


def param_report(variables: Mapping[str, Any], mask: Tree, *, n_tasks: int = 1,
                 trainable_count: Optional[int] = None) -> Dict[str, float]:
  """Trainable counts and the VPT paper's "total params" multiple.

  The backbone B is everything in 'params' except the head (each task trains a new head). Serving
  N tasks stores each task's trainable leaves t, plus one shared copy of the backbone unless every
  backbone weight is trained (then each task's copy is complete), all relative to B:

      total multiple (N tasks) = (B * [some backbone weight frozen] + N * t) / B.

  This is how the paper's Table 1 counts (24 tasks): Linear 1.02x, Partial-1 3.00x, Full 24.02x.
  trainable_count: t when it is less than the trainable leaves' size (pruned E2VPT prompts).
  """
  trainable, frozen = split(variables, mask)
  backbone = count({k: v for k, v in dict(variables.get("params", {})).items() if k != "head"})
  frozen_backbone = count({k: v for k, v in dict(frozen.get("params", {})).items() if k != "head"})
  shared = backbone if frozen_backbone else 0
  t = count(trainable) if trainable_count is None else int(trainable_count)
  return {
      "trainable": t,
      "backbone": backbone,
      "trainable_percent_of_backbone": 100.0 * t / backbone,
      "per_task_multiple": (shared + t) / backbone,
      "n_tasks": n_tasks,
      "total_multiple": (shared + n_tasks * t) / backbone,
  }
