"""The prompt plan: per layer, what happens to the prompt tokens. One plan serves the single-task
prompt module (`vpt.VPT`) and the multi-task server (`vpt_jax.serving`), and the fast path is
decided here and nowhere else.

Actions, for a layer l (the sequence it receives holds `carried` prompt tokens, 0 or p):

    keep     nothing changes (the previous layer's prompt outputs, if any, flow through)
    insert   fresh prompts go into the sequence after the prefix (no prompts were there)
    replace  fresh prompts replace the prompt outputs of layer l - 1 (VPT-deep)
    select   per example: its task's fresh prompts or the carried outputs (mixed-task batches)
    memory   fresh prompts enter as keys/values only (their outputs are never read); carried
             prompt outputs leave the sequence. The exact fast path.
    drop     the carried prompt outputs leave the sequence ("no expand" past the last prompt)

The plan is built from a (tasks, layers) table of where each task receives fresh prompts (one row
for a single task), so the counts of prompt tokens per layer are known statically and nobody
recovers them from sequence lengths.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

ACTIONS = ("keep", "insert", "replace", "select", "memory", "drop")
_FRESH = ("insert", "replace", "select")


@dataclasses.dataclass(frozen=True)
class PromptPlan:
  """Static per-layer actions and prompt counts (hashable: a field of flax modules)."""

  length: int
  actions: Tuple[str, ...]
  entry: int = 0          # prompt tokens already in layer 0's input (pixel-patch prompts)

  def action(self, layer: int) -> str:
    return self.actions[layer]

  def carried(self, layer: int) -> int:
    """Prompt tokens in the sequence that layer `layer` receives."""
    return self.entry if layer == 0 else self.output(layer - 1)

  def output(self, layer: int) -> int:
    """Prompt tokens in the sequence that layer `layer` computes (and outputs)."""
    a = self.actions[layer]
    if a in _FRESH:
      return self.length
    if a == "keep":
      return self.carried(layer)
    return 0

  @property
  def memory_layers(self) -> Tuple[int, ...]:
    return tuple(i for i, a in enumerate(self.actions) if a == "memory")


def edit(action: str, x: jax.Array, *, prefix: int, carried: int,
         fresh: Callable[[bool], jax.Array], choose: Optional[jax.Array] = None,
         ) -> Tuple[jax.Array, int, Optional[jax.Array]]:
  """Applies one layer's action to the sequence `x` (`carried` prompts after `prefix` rows).

  fresh(memory) gives the layer's fresh prompts ((batch, p, d); with memory=True they may be
  (p, d), shared by the batch); choose (batch,) bool picks fresh (True) or carried per example
  for 'select'. Returns (tokens, prompts in them, memory tokens or None).
  """
  k, n = prefix, carried
  if action == "keep":
    return x, n, None
  without = jnp.concatenate([x[:, :k], x[:, k + n:]], axis=1) if n else x
  if action == "drop":
    return without, 0, None
  if action == "memory":
    return without, 0, fresh(True)
  new = fresh(False).astype(x.dtype)
  if action == "select":
    new = jnp.where(choose[:, None, None], new, x[:, k:k + n])
  return jnp.concatenate([x[:, :k], new, x[:, k + n:]], axis=1), new.shape[1], None


def make(fresh: np.ndarray, length: int, *, expand: bool = True, reads_prompts: bool = False,
         fast_path: bool = True, entry: int = 0) -> PromptPlan:
  """The plan of prompts of `length` tokens, fresh where `fresh` (tasks, depth) is True.

  expand=False drops the prompt outputs after the last fresh layer; reads_prompts: the pooling
  reads prompt outputs (pool 'prompt' / 'all'), so the last layer's must be computed; fast_path:
  prompts whose outputs are never read become memory (keys/values only).
  """
  fresh = np.asarray(fresh, bool).reshape(-1, np.shape(fresh)[-1])
  depth = fresh.shape[1]
  fresh_any = fresh.any(axis=0)
  last = int(np.flatnonzero(fresh_any).max()) if length and fresh_any.any() else -1
  actions, carried = [], entry
  for i in range(depth):
    all_fresh, any_fresh = bool(fresh[:, i].all()), bool(fresh[:, i].any())
    if i == 0 and entry:
      a = "keep"  # the prompts that came in with the input are layer 0's own
    elif not length or not any_fresh:
      a = "drop" if carried and not expand and i > last else "keep"
    else:
      replaced = i + 1 < depth and bool(fresh[:, i + 1].all())
      dropped = not expand and i == last and i + 1 < depth
      unread = i == depth - 1 and not reads_prompts
      if all_fresh and fast_path and (replaced or dropped or unread):
        a = "memory"
      elif all_fresh:
        a = "replace" if carried else "insert"
      else:
        if not carried:
          raise ValueError(f"layer {i}: some tasks get fresh prompts and others have none in "
                           "the sequence; a mixed batch needs them at the same first layer")
        a = "select"
    actions.append(a)
    carried = length if a in _FRESH else (carried if a == "keep" else 0)
  return PromptPlan(length, tuple(actions), entry)


def prompted_layers(num_layers: int, *, deep: bool, depth: int = 0,
                    reverse: bool = False) -> Tuple[int, ...]:
  """The 0-based layers that receive fresh prompts."""
  if not deep:
    if depth or reverse:
      raise ValueError("config prompt.depth / prompt.reverse apply to VPT-deep (prompt.deep=True)")
    return (0,)
  if depth < 0 or depth > num_layers:
    raise ValueError(f"config prompt.depth={depth} must be in 0..{num_layers} (0 = all layers)")
  if reverse and not depth:
    raise ValueError("config prompt.reverse=True needs prompt.depth=k (the last k layers)")
  k = depth or num_layers
  return tuple(range(num_layers - k, num_layers)) if reverse else tuple(range(k))


def fresh_table(layers: Tuple[int, ...], depth: int) -> np.ndarray:
  """(1, depth) bool: True at `layers` (one task's row of the table `make` reads)."""
  row = np.zeros((1, depth), bool)
  row[0, list(layers)] = True
  return row
