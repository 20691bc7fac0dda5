"""A head-only protocol's whole lr x wd grid trained at once: jax.vmap over the hyperparameters.

On cached features (`vpt_jax.tuning.cache`) a linear probe or an MLP-k head is a few thousand
FLOPs per example, so one run per grid point spends its time on starting, caching the encoder's
output and compiling, not on training. Here the features are cached once and every point's train
state is stacked: one vmapped step advances all points on the same batch. The step is the trainer's
own (`steps.make_train_step`) with the point's optimizer built from traced lr and wd, and the
input order is a function of (seed, step) alone, so each point trains as its own run would: equal
within float rounding with vmap (the batched matmuls sum in another order, ~1 ulp per step, which
a diverging high-lr point amplifies), bit-identical with batching='map' (jax.lax.map over the
points inside one jitted step).

    results = grid.train_grid(config, [(lr, wd, workdir), ...])

Each point's workdir gets the results.json its run would write (plus 'vmapped_grid': the number of
points trained together) and its config.json; no checkpoints (the whole grid reruns in seconds).
Eligible: the cached path enters after the whole encoder (only the head, or the MLP-k head,
trains), one process.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vpt_jax.tuning import loop, optim, steps
from vpt_jax.tuning import workdir as workdir_lib


def make_traced_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int, lr: jax.Array,
                          wd: jax.Array) -> optax.GradientTransformation:
  """`optim.make_optimizer` with the peak lr and wd as (traced) arrays. The schedule is the one
  `optim.lr_schedule` makes (optax's warmup_cosine_decay_schedule, end 0), built from the same
  parts, which take a traced peak, so each value rounds exactly as in the point's own run."""
  optim.lr_schedule(ml_collections.ConfigDict({**cfg.to_dict(), "lr": 1.0}), steps_per_epoch)
  total = int(cfg.epochs * steps_per_epoch)
  warmup = max(int(cfg.warmup_epochs * steps_per_epoch), 0)
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup),
       optax.cosine_decay_schedule(lr, total - warmup, alpha=0.0)], [warmup])
  mask = optim._decay_mask(cfg.wd_exclude)  # pylint: disable=protected-access
  if cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(wd, mask),
                     optax.sgd(schedule, momentum=cfg.momentum or None))
  else:
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask)
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx


def why_not(run: loop.Run) -> str | None:
  """Why the prepared, cached run cannot train its grid vmapped (None: it can)."""
  if jax.process_count() > 1:
    return "it runs on several processes"
  if run.cached_layer != run.built.model.depth:
    return (f"only head-only protocols on cached features qualify (protocol "
            f"{run.config.protocol!r}: features cached at layer {run.cached_layer or 'none'})")
  if run.config.optim.name not in ("sgd", "adamw"):
    return f"optim.name={run.config.optim.name!r}"
  return None


def _check_points(configs: Sequence[ml_collections.ConfigDict]) -> None:
  """The points' configs may differ only in optim.lr and optim.wd."""
  def strip(c):
    d = c.to_dict()
    d["optim"] = {k: v for k, v in d["optim"].items() if k not in ("lr", "wd")}
    return d
  ref = strip(configs[0])
  for c in configs[1:]:
    if strip(c) != ref:
      raise ValueError("a vmapped grid's points may differ only in optim.lr and optim.wd")
  for c in configs:
    if c.optim.lr <= 0 or c.optim.wd < 0:
      raise ValueError(f"config optim.lr={c.optim.lr} must be > 0, optim.wd={c.optim.wd} >= 0")


def _stack(tree: Any, n: int) -> Any:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), tree)


BATCHING = ("vmap", "map")


def _jit_grid_steps(run: loop.Run, batching: str) -> Tuple[Callable, Callable]:
  """The jitted grid train and eval steps. batching 'vmap': the points' steps batched into one
  (wider matmuls); 'map': a loop over the points inside one jitted step (jax.lax.map), each the
  exact computation of its own run, so the results are bit-identical to it."""
  cfg, spe = run.config.optim, run.steps_per_epoch

  def train_one(state, frozen, batch, lr, wd):
    tx = make_traced_optimizer(cfg, spe, lr, wd)
    return steps.make_train_step(run.model, tx)(state, frozen, batch)

  if batching == "vmap":
    train_all = jax.vmap(train_one, in_axes=(0, None, None, 0, 0))
  elif batching == "map":
    train_all = lambda states, frozen, batch, lrs, wds: jax.lax.map(
        lambda p: train_one(p[0], frozen, batch, p[1], p[2]), (states, lrs, wds))
  else:
    raise ValueError(f"grid batching={batching!r}: expected one of {BATCHING}")
  eval_one = steps.make_eval_step(run.model)
  replicated, batch = run.shardings
  train = jax.jit(train_all, donate_argnums=(0,),
                  in_shardings=(replicated, replicated, batch, replicated, replicated),
                  out_shardings=(replicated, replicated))
  evaluate = jax.jit(jax.vmap(eval_one, in_axes=(0, None, None)),
                     in_shardings=(replicated, replicated, batch), out_shardings=replicated)
  return train, evaluate


def _evaluate(eval_step: Callable, trainable: Any, run: loop.Run, pipe) -> Dict[str, np.ndarray]:
  """Per point top-1 and loss over one split (the sums of `steps.evaluate`, per point)."""
  totals = None
  for batch in steps.prefetch_to_device(pipe.eval_batches(), run.shardings[1]):
    out = jax.device_get(eval_step(trainable, run.frozen, batch))
    out = {k: np.asarray(v, np.float64) for k, v in out.items()}
    totals = out if totals is None else {k: totals[k] + out[k] for k in totals}
  return {"top1": totals["correct"] / totals["count"], "loss": totals["loss_sum"] / totals["count"]}


def train_grid(config: ml_collections.ConfigDict, points: Sequence[Tuple[float, float, str]],
               scratch: str | None = None, return_trainable: bool = False,
               batching: str = "vmap"):
  """Trains config at every (lr, wd, workdir) of `points` at once; writes and returns each point's
  results (and, with return_trainable, the trained trees stacked along a leading point axis).

  `scratch`: the directory of the shared preparation (config.json of the base config; default
  the first point's workdir + '_vmapped'). batching: 'vmap' or 'map' (`_jit_grid_steps`).
  """
  if batching not in BATCHING:
    raise ValueError(f"grid batching={batching!r}: expected one of {BATCHING}")
  t_start = time.time()
  if not points:
    return []
  configs = []
  for lr, wd, _ in points:
    c = ml_collections.ConfigDict(config.to_dict())
    c.optim.lr, c.optim.wd = float(lr), float(wd)
    configs.append(c)
  _check_points(configs)
  run = loop.prepare(configs[0], scratch or points[0][2].rstrip("/") + "_vmapped")
  try:
    loop.cache_prefix(run)
    if (why := why_not(run)) is not None:
      raise ValueError(f"a vmapped lr x wd grid needs a head-only protocol on cached features: "
                       f"{why}")
    if int(run.state.step):
      raise ValueError(f"{run.workdir} holds a checkpoint: a vmapped grid starts from step 0")
    n = len(points)
    replicated, batch_sharding = run.shardings
    states = jax.device_put(_stack(run.state, n), replicated)
    lrs = jax.device_put(jnp.asarray([c.optim.lr for c in configs], jnp.float32), replicated)
    wds = jax.device_put(jnp.asarray([c.optim.wd for c in configs], jnp.float32), replicated)
    train_step, eval_step = _jit_grid_steps(run, batching)
    spe, total, every = run.steps_per_epoch, run.total_steps, run.config.eval_every_epochs
    best = np.full(n, -np.inf)
    batches = steps.prefetch_to_device(run.train_pipe.train_batches(0), batch_sharding)
    for step in range(total):
      states, metrics = train_step(states, run.frozen, next(batches), lrs, wds)
      s = step + 1
      if s % spe == 0 or s == total:
        loss = np.asarray(jax.device_get(metrics["loss"]))
        if not np.isfinite(loss).all():
          bad = [f"lr={configs[i].optim.lr:g} wd={configs[i].optim.wd:g}"
                 for i in np.flatnonzero(~np.isfinite(loss))]
          raise FloatingPointError(f"loss is not finite at step {s} for {', '.join(bad)} (what "
                                   f"the run of each would stop on)")
      if "val" in run.eval_pipes and s % spe == 0 and every and (s // spe) % every == 0:
        best = np.maximum(best, _evaluate(eval_step, states.trainable, run,
                                          run.eval_pipes["val"])["top1"])
    final = {name: _evaluate(eval_step, states.trainable, run, pipe)
             for name, pipe in run.eval_pipes.items()}
    report, wall = run.report, time.time() - t_start
    out = []
    for i, (c, (_, _, wd_dir)) in enumerate(zip(configs, points)):
      results: Dict[str, Any] = {}
      for name, r in final.items():
        results[f"{name}_top1"], results[f"{name}_loss"] = float(r["top1"][i]), float(r["loss"][i])
      results.update({
          "best_val_top1": float(best[i]) if np.isfinite(best[i]) else None,
          "trainable_params": report["trainable"],
          "trainable_percent_of_backbone": report["trainable_percent_of_backbone"],
          "backbone_params": report["backbone"],
          "per_task_multiple": report["per_task_multiple"],
          "cached_features_layer": run.cached_layer,
          "steps": total, "epochs": run.config.optim.epochs,
          "devices": jax.device_count(), "hosts": jax.process_count(),
          "wall_time_s": wall / n, "vmapped_grid": n, "grid_batching": batching,
          "config": {**run.config.to_dict(), "optim": {**run.config.optim.to_dict(),
                                                       "lr": c.optim.lr, "wd": c.optim.wd}},
      })
      workdir_lib.write_config(wd_dir, ml_collections.ConfigDict(results["config"]))
      with open(os.path.join(wd_dir, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=2, default=str)
      os.replace(os.path.join(wd_dir, "results.json.tmp"), os.path.join(wd_dir, "results.json"))
      out.append(results)
    run.say(f"vmapped grid: {n} points trained together in {wall:.1f} s")
    return (out, jax.device_get(states.trainable)) if return_trainable else out
  finally:
    run.ckpt.close()

