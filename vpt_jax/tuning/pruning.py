"""E2VPT prompt pruning (Han et al., ICCV 2023): importance scores, token/segment pruning, storage.

The masks are the 'prompt_masks' variables that `prompt.masks=True` adds to the VPT hooks: a token
mask (p,) and a segment mask (p, R), shared by every prompted layer. Both multiply the prompts, so
at all-ones they change nothing and their gradient says how much the loss depends on each token
and segment. The procedure, run end to end by `prune_pipeline` (`python -m vpt_jax.prune`):

1. train the dense model (prompts with masks of ones);
2. `importance`: S = E_x |dL(x)/d rho| for every mask entry rho, from per-example gradients over
   one epoch of training data (training-mode preprocessing and dropout, no parameter updates);
3. `prune_masks`: zero the lowest-scoring tokens, then in every kept token its lowest-scoring
   segments, by fractions;
4. rewind: retrain the prompts with the pruned masks fixed, from their initial values or from a
   fresh initialisation (the official code re-initialises);
5. `compact`: store only the kept tokens' kept segments plus their indices; its size is the real
   trainable parameter count.

Differences from the official code, on purpose: the score takes the absolute value per example
(the paper's formula; the code averages signed batch gradients), scoring does not step the
optimizer (the scores then describe the model being pruned, not a moving target), the masks are
not trained, and a pruned token is removed from attention rather than left in the sequence as a
zero vector (whose LayerNorm output, the LN bias, would still make a key and a value).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Mapping, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpt_jax import utils
from vpt_jax.prompts import e2vpt
from vpt_jax.tasks.classification import cross_entropy
from vpt_jax.tuning import rules

Tree = Dict[str, Any]
MASKS = e2vpt.COLLECTION
REWIND_INITS = ("fresh", "initial")


def default_config() -> ml_collections.ConfigDict:
  """The `prune` section of a config (used by `python -m vpt_jax.prune`).

  token_fraction: share of the p visual prompt tokens to prune (int(p * f), at most p - 1).
  segment_fraction: share of the R segments to prune in every kept token (int(R * f), at most
    R - max(1, R // 4): every kept token keeps 4 of 16 segments at least, as the official code).
  rewind_init: 'fresh' (a new random initialisation, seed + 1, as the official code) or
    'initial' (the dense run's initial prompt values, the lottery-ticket reading of rewinding).
  grid: '' (the one pair above) or 'tf:sf;tf:sf;...': every (token, segment) pruning level is
    rewound and the best on validation kept (ties to more pruning), as the official code's grid.
  """
  return ml_collections.ConfigDict(dict(token_fraction=0.5, segment_fraction=0.25,
                                        rewind_init="fresh", grid=""))


def levels(cfg: ml_collections.ConfigDict) -> Tuple[Tuple[float, float], ...]:
  """The (token_fraction, segment_fraction) pairs to rewind: `grid`, or the single pair."""
  if not cfg.get("grid", ""):
    return ((float(cfg.token_fraction), float(cfg.segment_fraction)),)
  out = []
  for item in cfg.grid.split(";"):
    try:
      tf, sf = (float(x) for x in item.split(":"))
    except ValueError:
      raise ValueError(f"config prune.grid={cfg.grid!r}: expected 'tf:sf;tf:sf;...', got "
                       f"{item!r}") from None
    for key, v in (("token_fraction", tf), ("segment_fraction", sf)):
      if not 0.0 <= v < 1.0:
        raise ValueError(f"config prune.grid={cfg.grid!r}: {key} {v} must be in [0, 1)")
    out.append((tf, sf))
  return tuple(dict.fromkeys(out))


def level_name(tf: float, sf: float) -> str:
  """The directory / file key of one pruning level, e.g. t0.5_s0.25."""
  return f"t{tf:g}_s{sf:g}"


def check_config(cfg: ml_collections.ConfigDict) -> None:
  utils.check_options(cfg, default_config(), "prune")
  for key in ("token_fraction", "segment_fraction"):
    if not 0.0 <= cfg[key] < 1.0:
      raise ValueError(f"config prune.{key}={cfg[key]} must be in [0, 1)")
  if cfg.rewind_init not in REWIND_INITS:
    raise ValueError(f"config prune.rewind_init={cfg.rewind_init!r}: expected one of "
                     f"{REWIND_INITS}")
  levels(cfg)


# ------------------------------------------------------------------------------------------------
# Importance.


def make_importance_step(model: Any, *, train: bool = True) -> Callable:
  """step(trainable, frozen, batch, rng) -> sums over the batch of |dL(x)/d mask| per entry.

  Per-example gradients (vmap of grad over single examples), so the absolute value is taken
  per example as in S = E_x |dL(x)/d rho|. Only the masks are differentiated.
  """

  def example_loss(masks, trainable, rest, image, label, rng):
    variables = rules.merge(trainable, {**rest, MASKS: masks})
    logits = model.apply(variables, image[None], train=train, rngs={"dropout": rng})
    return cross_entropy(logits, label[None])[0]

  per_example = jax.vmap(jax.grad(example_loss), in_axes=(None, None, None, 0, 0, 0))

  def step(trainable: Tree, frozen: Tree, batch: Mapping[str, jax.Array], rng: jax.Array):
    if MASKS not in frozen:
      raise ValueError("importance scores need prompt masks: set config prompt.masks=True")
    rest = {k: v for k, v in frozen.items() if k != MASKS}
    rngs = jax.random.split(rng, batch["label"].shape[0])
    grads = per_example(frozen[MASKS], trainable, rest, batch["image"], batch["label"], rngs)
    weight = batch.get("mask")
    def total(g):
      g = jnp.abs(g)
      if weight is not None:
        g = g * weight.reshape((-1,) + (1,) * (g.ndim - 1))
      return jnp.sum(g, axis=0)
    return jax.tree.map(total, grads)
  return step


def importance(step: Callable, trainable: Tree, frozen: Tree, batches: Iterable[Mapping],
               rng: jax.Array, *, progress: Callable[[int], None] = lambda i: None
               ) -> Dict[str, np.ndarray]:
  """{'tokens': (p,), 'segments': (p, R)}: mean of |dL(x)/d rho| over the examples of `batches`."""
  sums, count = None, 0.0
  for i, batch in enumerate(batches):
    out = step(trainable, frozen, batch, jax.random.fold_in(rng, i))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    count += float(np.sum(batch["mask"])) if "mask" in batch else len(batch["label"])
    progress(i + 1)
  if sums is None:
    raise ValueError("importance scores need at least one batch")
  h = jax.device_get(sums)["hooks"]
  return {"tokens": np.asarray(h["token_mask"]) / count,
          "segments": np.asarray(h["segment_mask"]) / count}


# ------------------------------------------------------------------------------------------------
# Pruning.


def min_segments(r: int) -> int:
  """Segments every kept token keeps at least: a quarter (4 of 16, the official
  MIN_NUMBER_CLS_TOKEN_PIECE), and at least one."""
  return max(1, r // 4)


def counts(p: int, r: int, token_fraction: float, segment_fraction: float) -> Tuple[int, int]:
  """(tokens pruned, segments pruned per kept token): int(n * f), keeping at least one token and
  `min_segments(r)` segments of each kept token, as the official code caps them."""
  return min(int(p * token_fraction), p - 1), min(int(r * segment_fraction), r - min_segments(r))


def prune_masks(scores: Mapping[str, np.ndarray], token_fraction: float,
                segment_fraction: float) -> Dict[str, np.ndarray]:
  """0/1 masks: the lowest-scoring tokens off, then each kept token's lowest segments off.

  Ties go to the lower index being pruned first (a stable sort), so the result is deterministic.
  Pruned tokens get all-zero segment rows (they are gone; their segments mean nothing).
  """
  tok = np.asarray(scores["tokens"], np.float64)
  seg = np.asarray(scores["segments"], np.float64)
  p, r = seg.shape
  n_tok, n_seg = counts(p, r, token_fraction, segment_fraction)
  tokens = np.ones(p, np.float32)
  tokens[np.argsort(tok, kind="stable")[:n_tok]] = 0.0
  segments = np.zeros((p, r), np.float32)
  for t in np.flatnonzero(tokens):
    segments[t] = 1.0
    segments[t, np.argsort(seg[t], kind="stable")[:n_seg]] = 0.0
  return {"tokens": tokens, "segments": segments}


# ------------------------------------------------------------------------------------------------
# Compact storage.


def dims_of(segment_row: np.ndarray, width: int) -> np.ndarray:
  """The dimensions (ascending) that the kept segments of one token cover (strided: j % R)."""
  r = len(segment_row)
  return np.flatnonzero(segment_row[np.arange(width) % r] != 0)


def compact(tokens: np.ndarray, masks: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Only what survives pruning: the kept tokens' kept dimensions, with their indices.

  tokens: (sets, p, d) prompt values. Returns 'values' (sets, kept tokens, kept dims),
  'token_index' (kept tokens,), 'dim_index' (kept tokens, kept dims). Every kept token keeps the
  same number of segments, so the arrays are rectangular.
  """
  tokens = np.asarray(tokens)
  d = tokens.shape[-1]
  keep = np.flatnonzero(masks["tokens"])
  dims = np.stack([dims_of(masks["segments"][t], d) for t in keep])
  values = np.stack([tokens[:, t, dims[i]] for i, t in enumerate(keep)], axis=1)
  return {"values": values.astype(np.float32), "token_index": keep.astype(np.int32),
          "dim_index": dims.astype(np.int32)}


def expand(packed: Mapping[str, np.ndarray], *, width: int, segments: int
           ) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
  """A compact set as prompts of a model with only the kept tokens: (tokens, its masks)."""
  values, dims = np.asarray(packed["values"]), np.asarray(packed["dim_index"])
  n_sets, k, _ = values.shape
  tokens = np.zeros((n_sets, k, width), np.float32)
  seg = np.zeros((k, segments), np.float32)
  for i in range(k):
    tokens[:, i, dims[i]] = values[:, i]
    seg[i, np.unique(dims[i] % segments)] = 1.0
  return tokens, {"tokens": np.ones(k, np.float32), "segments": seg}


def pruned_count(trainable: Tree, masks: Mapping[str, np.ndarray]) -> int:
  """Trainable scalars once pruned: the masked-off prompt entries are not parameters."""
  total = rules.count(trainable)
  tokens = trainable.get("prompts", {}).get("hooks", {}).get("tokens")
  if tokens is None:
    return total
  n_sets, _, d = tokens.shape
  seg = np.asarray(masks["segments"]) * np.asarray(masks["tokens"])[:, None]
  kept = int(seg.sum()) * (d // seg.shape[1])
  return total - int(np.prod(tokens.shape)) + n_sets * kept

