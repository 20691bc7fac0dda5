"""E2VPT pruning and rewinding, end to end (`python -m vpt_jax.prune --config=FILE --workdir=DIR`).

Stages, each in the workdir and each skipped when its output exists (an interrupted run resumes;
the training stages resume from their own checkpoints):

    dense/          the config trained with prompt.masks=True (masks all ones)
    scores.npz      importance of every token / segment mask entry over one training epoch
    masks/t{tf}_s{sf}.npz   0/1 masks of each pruning level (config.prune.token_fraction /
                    segment_fraction, or every pair of config.prune.grid)
    rewind/t{tf}_s{sf}/     the prompts retrained with those masks fixed (config.prune.rewind_init),
                    and its pruned.npz; directories keyed by the fractions, so a rerun with
                    other fractions neither reuses nor collides with another level's run
    pruned.npz      compact, of the level chosen on validation (ties to more pruning): the kept
                    tokens' kept dimensions, their indices, the other trainable leaves (head,
                    key-value prompts); `load_pruned(rewind_dir)` rebuilds a model
    prune_results.json   dense vs rewound accuracy, every level's, the real trainable counts
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Dict, Tuple

import jax
import ml_collections
import numpy as np

from vpt_jax import utils
from vpt_jax.data import pipeline, sources
from vpt_jax.prompts import e2vpt
from vpt_jax.tuning import build, loop, pruning, rules, steps, workdir as workdir_lib


def stage_configs(config: ml_collections.ConfigDict, workdir: str, level: str = ""
                  ) -> Tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(dense config, rewind config of pruning level `level`) for a user's config."""
  pruning.check_config(config.prune)
  dense = ml_collections.ConfigDict(config.to_dict())
  dense.prompt.masks = True
  dense.prompt.mask_file = ""
  rewind = ml_collections.ConfigDict(dense.to_dict())
  rewind.prompt.mask_file = os.path.join(workdir, "masks", f"{level or 'masks'}.npz")
  if config.prune.rewind_init == "fresh":
    rewind.prompt.init_seed = config.seed + 1 if config.prompt.init_seed < 0 else \
        config.prompt.init_seed + 1
  return dense, rewind


def score(dense_dir: str, *, say=print) -> Dict[str, np.ndarray]:
  """Importance scores of the trained dense run in `dense_dir` over one training epoch."""
  tuned = workdir_lib.load_tuned(dense_dir, which="last")
  config, model = tuned.config, tuned.model
  trainable, frozen = tuned.split()
  d = config.data
  split = sources.load_splits(d, [d.train_split])[d.train_split]
  pre = tuned.preprocess(train=True)
  pipe = pipeline.Pipeline(split, pre, batch_size=config.batch_size, seed=config.seed + 7919,
                           process_index=jax.process_index(), process_count=jax.process_count())
  replicated, batch_sharding = steps.mesh_shardings()
  step = jax.jit(pruning.make_importance_step(model),
                 in_shardings=(replicated, replicated, batch_sharding, replicated))
  spe = pipe.steps_per_epoch
  batches = steps.prefetch_to_device(itertools.islice(pipe.train_batches(0), spe), batch_sharding)
  say(f"importance: one epoch, {spe} batches of {config.batch_size} (per-example gradients)")
  tick = max(1, spe // 10)
  return pruning.importance(
      step, jax.device_put(trainable, replicated), jax.device_put(frozen, replicated), batches,
      jax.random.PRNGKey(config.seed + 1),
      progress=lambda i: say(f"  importance batch {i}/{spe}") if i % tick == 0 else None)


def save_pruned(rewind_dir: str, path: str) -> Dict[str, Any]:
  """Writes the compact pruned set of the rewound run; returns its counts."""
  tuned = workdir_lib.load_tuned(rewind_dir, which="last")
  config = tuned.config
  trainable, _ = tuned.split()
  masks = {k: np.asarray(v) for k, v in np.load(config.prompt.mask_file).items()}
  tokens = np.asarray(trainable["prompts"]["hooks"]["tokens"])
  packed = pruning.compact(tokens, masks)
  arrays = {f"prompt_{k}": v for k, v in packed.items()}
  for p, leaf in zip(rules.leaf_paths(trainable), jax.tree.leaves(trainable)):
    if p != "prompts/hooks/tokens":
      arrays[p] = np.asarray(leaf)
  utils.atomic_savez(path, arrays)
  stored = sum(v.size for k, v in arrays.items() if not k.endswith("_index"))
  return {"pruned_trainable_params": int(stored),
          "dense_trainable_params": rules.count(trainable),
          "kept_tokens": int(masks["tokens"].sum()), "prompt_length": int(len(masks["tokens"])),
          "kept_segments_per_token": int(masks["segments"].sum(1).max()),
          "segments": int(masks["segments"].shape[1])}


def load_pruned(rewind_dir: str, path: str | None = None) -> Tuple[Any, Dict[str, Any]]:
  """(model, variables) of the compact pruned model: only the kept tokens are in the sequence."""
  config = workdir_lib.read_config(rewind_dir)
  path = path or os.path.join(rewind_dir, "pruned.npz")
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files}
  packed = {k[len("prompt_"):]: arrays.pop(k) for k in list(arrays) if k.startswith("prompt_")}
  small = ml_collections.ConfigDict(config.to_dict())
  small.prompt.length = int(len(packed["token_index"]))
  small.prompt.mask_file = ""
  small.prompt.init_seed = -1
  built = build.build(small)
  width, r = built.model.width, config.prompt.segments
  tokens, masks = pruning.expand(packed, width=width, segments=r)
  variables = dict(built.variables)
  variables.update(e2vpt.mask_variables(masks["tokens"], masks["segments"]))
  flat = dict(zip(rules.leaf_paths(variables), jax.tree.leaves(variables)))
  flat["prompts/hooks/tokens"] = tokens
  for p, v in arrays.items():
    if p not in flat:
      raise ValueError(f"{path}: leaf {p!r} does not exist in the model of {rewind_dir}")
    if np.shape(flat[p]) != v.shape:
      raise ValueError(f"{path}: leaf {p!r} has shape {v.shape}, the model needs "
                       f"{np.shape(flat[p])}")
    flat[p] = v
  treedef = jax.tree.structure(variables)
  return built.model, jax.tree.unflatten(treedef, [flat[p] for p in
                                                   rules.leaf_paths(variables)])


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Every stage (each skipped when done); returns the summary written to prune_results.json."""
  os.makedirs(workdir, exist_ok=True)
  lead = jax.process_index() == 0
  say = utils.lead_printer()
  dense_cfg, _ = stage_configs(config, workdir)
  dense_dir = os.path.join(workdir, "dense")

  def trained(cfg, d, name):
    path = os.path.join(d, "results.json")
    if os.path.exists(path):
      say(f"[{name}] done before: {path}")
      with open(path) as f:
        return json.load(f)
    say(f"[{name}] training in {d}")
    return loop.train_and_evaluate(cfg, d)

  dense = trained(dense_cfg, dense_dir, "1/4 dense")
  scores_path = os.path.join(workdir, "scores.npz")
  if os.path.exists(scores_path):
    scores = dict(np.load(scores_path))
  else:
    say("[2/4 importance]")
    scores = score(dense_dir, say=say)
    if lead:
      utils.atomic_savez(scores_path, scores)
  runs = []
  for tf, sf in pruning.levels(config.prune):
    level = pruning.level_name(tf, sf)
    _, rewind_cfg = stage_configs(config, workdir, level)
    rewind_cfg.prune.token_fraction, rewind_cfg.prune.segment_fraction = tf, sf
    rewind_dir = os.path.join(workdir, "rewind", level)
    masks = pruning.prune_masks(scores, tf, sf)
    if lead:
      os.makedirs(os.path.dirname(rewind_cfg.prompt.mask_file), exist_ok=True)
      utils.atomic_savez(rewind_cfg.prompt.mask_file, masks)
    say(f"[3/4 prune {level}] keeping {int(masks['tokens'].sum())}/{len(masks['tokens'])} "
        f"tokens, {int(masks['segments'].sum(1).max())}/{masks['segments'].shape[1]} segments "
        f"each: {rewind_cfg.prompt.mask_file}")
    r = trained(rewind_cfg, rewind_dir, f"4/4 rewind {level} ({config.prune.rewind_init} init)")
    runs.append({"level": level, "token_fraction": tf, "segment_fraction": sf, "dir": rewind_dir,
                 **{k: r[k] for k in ("val_top1", "test_top1") if k in r}, "_r": r})
  # The official choice: best last-epoch validation, ties to more pruning.
  best = max(runs, key=lambda x: (x.get("val_top1") or 0.0, x["token_fraction"],
                                  x["segment_fraction"]))
  rewound = best.pop("_r")
  summary: Dict[str, Any] = {"prune": config.prune.to_dict(), "chosen": best["level"],
                             "rewind_dir": best["dir"],
                             "levels": [{k: v for k, v in x.items() if k != "_r"} for x in runs]}
  if lead:
    counts = save_pruned(best["dir"], os.path.join(best["dir"], "pruned.npz"))
    save_pruned(best["dir"], os.path.join(workdir, "pruned.npz"))
    summary.update(counts)
  for name, r in (("dense", dense), ("rewind", rewound)):
    for k in ("val_top1", "test_top1"):
      if k in r:
        summary[f"{name}_{k}"] = r[k]
  if lead:
    with open(os.path.join(workdir, "prune_results.json"), "w") as f:
      json.dump(summary, f, indent=2)
    say("pruned: " + ", ".join(f"{k} {v}" for k, v in summary.items()
                               if k not in ("prune", "levels")))
  return summary
