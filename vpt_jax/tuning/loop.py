"""One training run, as small steps: prepare, cache a frozen prefix, fit, evaluate.

    results = loop.train_and_evaluate(config, workdir)

Restarted with the same config and workdir, a run continues from its last checkpoint and ends
with bit-identical trainable parameters (the input order is a function of seed and step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import ml_collections
import numpy as np

from vpt_jax import utils
from vpt_jax.data import pipeline, sources
from vpt_jax.prompts import e2vpt
from vpt_jax.tuning import build, cache, memory, optim, pruning, rules, seg_loop, steps
from vpt_jax.tuning import workdir as workdir_lib
from vpt_jax.tuning.metrics import MetricWriter, Progress

Tree = Dict[str, Any]


@dataclasses.dataclass
class Run:
  """What the steps of a run share once it is prepared (everything checked, state restored)."""

  config: ml_collections.ConfigDict
  workdir: str
  built: build.Built
  model: Any                     # the model the steps apply (entered later with cached features)
  train_pipe: Any
  eval_pipes: Dict[str, Any]
  steps_per_epoch: int
  total_steps: int
  tx: Any
  schedule: Any
  shardings: Tuple[Any, Any]     # (replicated, batch)
  frozen_sharding: Any          # the frozen tree's: replicated or sharded (model.frozen_sharding)
  frozen: Tree
  state: steps.TrainState
  ckpt: workdir_lib.Checkpointer
  report: Dict[str, float]
  deterministic: bool = False    # the training preprocessing has no random augmentation
  cached_layer: int = 0
  say: Callable[..., None] = print


def _pruned_count(variables: Tree, trainable: Tree) -> Optional[int]:
  """The real trainable count of E2VPT-pruned prompts (masked-off entries are not parameters)."""
  masks = e2vpt.masks_of(variables)
  return None if masks is None else pruning.pruned_count(trainable, masks)


def _pipelines(config: ml_collections.ConfigDict, image_size: int):
  """(train pipeline, {'val': ..., 'test': ...}, training-mode preprocessing) of the config."""
  d = config.data
  if not d.train_split:
    raise ValueError("config data.train_split is empty")
  pre_train = pipeline.make_preprocess(d, image_size, train=True)
  pre_eval = pipeline.make_preprocess(d, image_size, train=False)
  names = [n for n in (d.train_split, d.val_split, d.test_split) if n]
  splits = sources.load_splits(d, list(dict.fromkeys(names)))
  kw = dict(batch_size=config.batch_size, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count())
  train_pipe = pipeline.Pipeline(splits[d.train_split], pre_train, **kw)
  if train_pipe.steps_per_epoch == 0:
    raise ValueError(f"config batch_size={config.batch_size} is larger than the training split "
                     f"{d.train_split!r} ({len(splits[d.train_split])} examples)")
  eval_pipes = {name: pipeline.Pipeline(splits[s], pre_eval, **kw)
                for name, s in (("val", d.val_split), ("test", d.test_split)) if s}
  return train_pipe, eval_pipes, pre_train


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Checks everything before any compute, builds the model, the pipelines and the train state
  (restored from the workdir's last checkpoint when there is one)."""
  say = utils.lead_printer()
  config = ml_collections.ConfigDict(config.to_dict())
  build.check_config(config)
  pipeline.make_preprocess(config.data, 1, train=True)  # data options, before the backbone loads
  if not config.model.num_classes:
    config.model.num_classes = sources.num_classes(config.data)
  built = build.build(config)
  model = built.model
  if model.image_size[0] != model.image_size[1]:
    raise ValueError(f"the input pipeline makes square images; model image_size is "
                     f"{tuple(model.image_size)}")
  train_pipe, eval_pipes, pre_train = _pipelines(config, model.image_size[0])
  spe = train_pipe.steps_per_epoch
  total = int(config.optim.epochs * spe)

  replicated, batch_sharding = steps.mesh_shardings()
  trainable, frozen = rules.split(built.variables, built.mask)
  tx, schedule = optim.make_optimizer(config.optim, spe)
  state = jax.device_put(
      steps.create_train_state(trainable, tx, jax.random.PRNGKey(config.seed)), replicated)
  ckpt = workdir_lib.Checkpointer(workdir, built.fingerprint(), keep=config.keep_checkpoints,
                                 optim=config.optim.to_dict())
  state = workdir_lib.resume(ckpt, state, replicated, workdir, config, say)
  frozen = memory.store_frozen(frozen, config.model.get("frozen_dtype", "float32"))
  frozen_sharding = memory.frozen_shardings(frozen, replicated.mesh,
                                            config.model.get("frozen_sharding", "replicated"))
  report = rules.param_report(built.variables, built.mask,
                              trainable_count=_pruned_count(built.variables, trainable))
  say(f"model: {model.depth} layers, width {model.width}, {config.model.num_classes} classes; "
      f"protocol {config.protocol}: {report['trainable']:,} trainable parameters "
      f"({report['trainable_percent_of_backbone']:.3f}% of the {report['backbone']:,} backbone); "
      f"{len(train_pipe.split)} training examples, {spe} steps/epoch, {total} steps")
  run = Run(config=config, workdir=workdir, built=built, model=model, train_pipe=train_pipe,
            eval_pipes=eval_pipes, steps_per_epoch=spe, total_steps=total, tx=tx,
            schedule=schedule, shardings=(replicated, batch_sharding),
            frozen_sharding=frozen_sharding, frozen=jax.device_put(frozen, frozen_sharding),
            state=state, ckpt=ckpt, report=report,
            deterministic=getattr(pre_train, "deterministic", False), say=say)
  return run


def cache_prefix(run: Run) -> None:
  """The cached-features path: the frozen layers before the first trainable part run once per
  image, and the steps enter the model after them (`vpt_jax.tuning.cache`)."""
  pipes = {"train": run.train_pipe, **run.eval_pipes}
  plan = cache.plan(run.model, run.built.mask, mode=run.config.get("cache_features", "auto"),
                    deterministic=run.deterministic,
                    num_examples=sum(len(p.split) for p in pipes.values()),
                    process_count=jax.process_count())
  if not plan.layer:
    run.say(cache.describe(plan, run.model.depth))
    return
  t0 = time.time()
  run.model, pipes, nbytes = cache.cache_pipelines(run.model, plan.layer, run.built.variables,
                                                   pipes, microbatch=_chunk_rows(run))
  run.train_pipe = pipes.pop("train")
  run.eval_pipes = pipes
  run.cached_layer = plan.layer
  run.say(cache.describe(plan, run.built.model.depth, f"{nbytes / 2**20:.0f} MiB of token "
                                                      f"sequences computed in "
                                                      f"{time.time() - t0:.1f} s"))


def _chunk_rows(run: Run) -> int:
  """`microbatch_size`, or with 0 on a CPU, rows of about `steps.CPU_CHUNK_BYTES` of
  activations (0: whole batches)."""
  return steps.auto_microbatch(run.config.get("microbatch_size", 0),
                               build.activation_bytes_per_row(run.config, run.built.model),
                               jax.default_backend())


def microbatch(run: Run) -> int:
  """Rows per device per chunk of the train and eval steps (0: whole batches)."""
  mb = _chunk_rows(run)
  return mb if steps.num_chunks(run.config.batch_size // jax.device_count(), mb) > 1 else 0


def _jit_steps(run: Run) -> Tuple[Callable, Callable]:
  replicated, batch = run.shardings
  gather = lambda step: memory.gathered(step, run.frozen_sharding, replicated)
  mb = microbatch(run)
  if mb:
    rows = run.config.batch_size // jax.device_count()
    setting = run.config.get("microbatch_size", 0)
    run.say(f"microbatches: each device's {rows} rows in {steps.num_chunks(rows, mb)} chunks, "
            f"one after the other (microbatch_size={setting}"
            f"{': automatic, CPU' if not setting else ''})")
  kw = dict(microbatch=mb, devices=jax.device_count())
  train_step = jax.jit(gather(steps.make_train_step(run.model, run.tx, run.schedule, **kw)),
                       donate_argnums=(0,), in_shardings=(replicated, run.frozen_sharding, batch),
                       out_shardings=(replicated, replicated))
  eval_step = jax.jit(gather(steps.make_eval_step(run.model, **kw)),
                      in_shardings=(replicated, run.frozen_sharding, batch),
                      out_shardings=replicated)
  return train_step, eval_step


class _Tally:
  """Sums of the train metrics between log lines; stops the run on a non-finite loss."""

  def __init__(self, run: Run):
    self.run, self.sums, self.last_good = run, {}, run.ckpt.latest_step()

  def add(self, step: int, metrics) -> None:
    host = jax.device_get(metrics)
    for k in ("loss", "grad_norm"):
      if k in host and not np.isfinite(host[k]):
        self.stop(step, f"{k} is {host[k]}")
    for k, v in host.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.sums["_n"] = self.sums.get("_n", 0.0) + 1

  def stop(self, step: int, what: str) -> None:
    """Raises FloatingPointError naming the last checkpoint known finite and what to do."""
    self.run.ckpt.wait()
    spe, wd = self.run.steps_per_epoch, self.run.workdir
    raise FloatingPointError(
        f"{what} at step {step} (epoch {(step - 1) // spe + 1}); stopping without saving it. "
        + (f"The last good checkpoint (step {self.last_good}) is in {wd}/checkpoints/last "
           "(checked finite). "
           if self.last_good is not None else "No finite checkpoint had been saved yet. ")
        + "Rerun in a fresh workdir with a lower optim.lr (or optim.grad_clip > 0), "
          "or check the data for bad values.")

  def check_state(self, step: int, trainable: Tree) -> None:
    """Stops before a save if the update made any trainable leaf non-finite (the loss of a step
    is computed before its update, so it cannot see this)."""
    bad = [p for p, x in zip(rules.leaf_paths(trainable), jax.tree.leaves(trainable))
           if not np.isfinite(np.asarray(jax.device_get(x))).all()]
    if bad:
      self.stop(step, f"the updated trainable state is not finite ({', '.join(bad[:3])})")

  def means(self) -> Dict[str, float]:
    n = self.sums.pop("_n", 0.0)
    out = {k: v / n for k, v in self.sums.items()} if n else {}
    self.sums.clear()
    return out


def fit(run: Run, writer: MetricWriter, train_step: Callable,
        eval_step: Callable) -> Optional[float]:
  """Trains from the state's step to the end, validating and checkpointing on schedule.

  Returns the best validation top-1 seen (None without validation).
  """
  config, spe, total = run.config, run.steps_per_epoch, run.total_steps
  batch_sharding = run.shardings[1]
  start = int(run.state.step)
  progress = Progress(total, spe, config.batch_size, start, enabled=jax.process_index() == 0)
  if start:
    run.ckpt.complete_best(run.state)
  tally, best_val, pending = _Tally(run), run.ckpt.best_val_top1(), None
  batches = steps.prefetch_to_device(run.train_pipe.train_batches(start), batch_sharding)
  for step in range(start, total):
    run.state, metrics = train_step(run.state, run.frozen, next(batches))
    if pending is not None:
      tally.add(*pending)  # checked one step late, so the host never stalls the device
    pending = (step + 1, metrics)
    s = step + 1
    epoch_end = s % spe == 0
    save_now = (epoch_end if not config.checkpoint_every_steps
                else s % config.checkpoint_every_steps == 0) or s == total
    if s % config.log_every_steps == 0 or epoch_end or save_now:
      tally.add(*pending)
      pending = None
    if s == start + 1:
      progress.restart_clock(s)  # the first step includes compilation
    if (s % config.log_every_steps == 0 or s == total) and tally.sums.get("_n"):
      means = tally.means()
      progress.line(s, means)
      writer.write(s, {f"train/{k}": v for k, v in means.items()})
    val_top1 = None
    every = config.eval_every_epochs
    if "val" in run.eval_pipes and epoch_end and every and (s // spe) % every == 0:
      val = steps.evaluate(eval_step, run.state.trainable, run.frozen, run.eval_pipes["val"],
                           batch_sharding)
      val_top1 = val["top1"]
      best_val = val_top1 if best_val is None else max(best_val, val_top1)
      writer.write(s, {"val/top1": val["top1"], "val/loss": val["loss"]})
      run.say(f"step {s}: validation top-1 {val['top1']:.4f} (loss {val['loss']:.4f})")
      progress.restart_clock(s)
    if save_now or val_top1 is not None:
      tally.check_state(s, run.state.trainable)
      run.ckpt.save(run.state, val_top1)
      tally.last_good = s
  if pending is not None:
    tally.add(*pending)
  run.ckpt.wait()
  return best_val


def evaluate(run: Run, writer: MetricWriter, eval_step: Callable) -> Dict[str, float]:
  """Top-1 and loss of the final state on every evaluation split."""
  results = {}
  for name, pipe in run.eval_pipes.items():
    r = steps.evaluate(eval_step, run.state.trainable, run.frozen, pipe, run.shardings[1])
    results[f"{name}_top1"] = r["top1"]
    results[f"{name}_loss"] = r["loss"]
    writer.write(run.total_steps, {f"{name}/top1": r["top1"], f"{name}/loss": r["loss"]})
  return results


def _write_results(run: Run, results: Dict[str, Any]) -> None:
  if jax.process_index() != 0:
    return
  # Written whole, then renamed: another job of a split protocol may read it at any moment.
  tmp = os.path.join(run.workdir, "results.json.tmp")
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2, default=str)
  os.replace(tmp, os.path.join(run.workdir, "results.json"))
  run.say("results: " + ", ".join(f"{k} {results[k]:.4f}" for k in ("val_top1", "test_top1")
                                  if k in results))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains what the config's rule selects, evaluates, checkpoints; returns the results dict."""
  if "seg" in config:  # a segmentation run (SETR-PUP heads): `vpt_jax.tuning.seg_loop`
    return seg_loop.train_and_evaluate(config, workdir)
  t_start = time.time()
  lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    return _train_and_evaluate(config, workdir, t_start)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        t_start: float) -> Dict[str, Any]:
  run = prepare(config, workdir)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  try:
    cache_prefix(run)
    train_step, eval_step = _jit_steps(run)
    best_val = fit(run, writer, train_step, eval_step)
    results: Dict[str, Any] = evaluate(run, writer, eval_step)
    report = run.report
    results.update({
        "best_val_top1": best_val,
        "trainable_params": report["trainable"],
        "trainable_percent_of_backbone": report["trainable_percent_of_backbone"],
        "backbone_params": report["backbone"],
        "per_task_multiple": report["per_task_multiple"],
        "cached_features_layer": run.cached_layer or None,
        "steps": run.total_steps, "epochs": run.config.optim.epochs,
        "devices": jax.device_count(), "hosts": jax.process_count(),
        "wall_time_s": time.time() - t_start,
        "config": run.config.to_dict(),
    })
    _write_results(run, results)
    return results
  finally:
    writer.close()
    run.ckpt.close()
