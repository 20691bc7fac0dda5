"""Optimizer, train state and the jitted steps; gradients only for what trains.

The variables are split once by the trainable rule (`vpt_jax.partition`). The train step takes the
trainable tree as the differentiated argument and the frozen tree as a plain input, so XLA never
forms a gradient for a frozen weight: for VPT the backward pass only propagates activation
gradients down to the prompts (~2x the forward FLOPs instead of ~3x). Everything that reads
gradients (global norm for logging, clipping, the optimizer) sees the trainable tree only.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vpt_jax import partition

Tree = Dict[str, Any]


def default_optim_config() -> ml_collections.ConfigDict:
  """The `optim` section of a config, with the VPT paper's defaults.

  name: 'sgd' (momentum, coupled L2 weight decay as torch.optim.SGD) or 'adamw' (decoupled).
  lr: peak learning rate, as used (no hidden scaling: multiply by batch_size/256 yourself to
    follow the official tuning scripts' convention of quoting lr at batch 256).
  wd: weight decay. wd_exclude: path regexes without weight decay (the official code exempts the
    head bias).
  warmup_epochs, epochs: linear warmup from 0, then cosine decay to 0, per step.
  grad_clip: clip the trainable gradients to this global norm (0 = off).
  """
  return ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, wd=1e-4, wd_exclude=("params/head/bias",),
      warmup_epochs=10, epochs=100, grad_clip=0.0, b1=0.9, b2=0.999, eps=1e-8))


def lr_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  if cfg.lr <= 0:
    raise ValueError(f"config optim.lr={cfg.lr} must be > 0")
  if cfg.epochs <= 0 or not 0 <= cfg.warmup_epochs < cfg.epochs:
    raise ValueError(f"config optim.warmup_epochs={cfg.warmup_epochs} must be in "
                     f"[0, optim.epochs={cfg.epochs})")
  total = int(cfg.epochs * steps_per_epoch)
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 0), total, 0.0)


def _decay_mask(patterns) -> Callable[[Tree], Tree]:
  compiled = [re.compile(p) for p in patterns]

  def mask(tree: Tree) -> Tree:
    flat = flax.traverse_util.flatten_dict(tree)
    return flax.traverse_util.unflatten_dict(
        {k: not any(c.fullmatch("/".join(k)) for c in compiled) for k in flat})
  return mask


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                   ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation for the trainable tree, and its learning-rate schedule."""
  schedule = lr_schedule(cfg, steps_per_epoch)
  mask = _decay_mask(cfg.wd_exclude)
  if cfg.wd < 0:
    raise ValueError(f"config optim.wd={cfg.wd} must be >= 0")
  if cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.wd, mask),
                     optax.sgd(schedule, momentum=cfg.momentum or None))
  elif cfg.name == "adamw":
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.wd, mask=mask)
  else:
    raise ValueError(f"config optim.name={cfg.name!r}: expected 'sgd' or 'adamw'")
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx, schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  trainable: Tree
  opt_state: Any
  rng: jax.Array


def create_train_state(trainable: Tree, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                    opt_state=tx.init(trainable), rng=rng)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_loss_fn(model: Any) -> Callable:
  """loss(trainable, frozen, images, labels, rng) -> (mean loss, logits)."""

  def loss_fn(trainable, frozen, images, labels, rng):
    variables = partition.merge(trainable, frozen)
    logits = model.apply(variables, images, train=True, rngs={"dropout": rng})
    return cross_entropy(logits, labels).mean(), logits
  return loss_fn


def make_train_step(model: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
  """train_step(state, frozen, batch) -> (state, metrics); jit it (donating the state)."""
  grad_fn = jax.value_and_grad(make_loss_fn(model), has_aux=True)

  def train_step(state: TrainState, frozen: Tree, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, logits), grads = grad_fn(state.trainable, frozen, batch["image"], batch["label"], rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "grad_norm": optax.tree.norm(grads),
    }
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics
  return train_step


def make_eval_step(model: Any) -> Callable:
  """eval_step(trainable, frozen, batch) -> sums of loss and correct over the unmasked examples.

  `batch['mask']` (optional, 1 = real example) lets the last, padded batch count correctly.
  """

  def eval_step(trainable: Tree, frozen: Tree, batch: Mapping[str, jax.Array]):
    logits = model.apply(partition.merge(trainable, frozen), batch["image"])
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
            "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
  return eval_step


# ------------------------------------------------------------------------------------------------
# The training run.


def mesh_shardings():
  """A 1-D device mesh over every device of every host: batch split, parameters replicated."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return replicated, batch


def _to_global(local: Mapping[str, np.ndarray], sharding) -> Dict[str, jax.Array]:
  """This host's rows of a global batch -> a global array sharded over all devices."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def prefetch_to_device(batches, sharding, depth: int = 2):
  """Keeps `depth` batches already on the devices, so the next step never waits for a copy."""
  queue = collections.deque()
  for batch in batches:
    queue.append(_to_global(batch, sharding))
    if len(queue) >= depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def evaluate(eval_step: Callable, trainable: Tree, frozen: Tree, pipe, sharding) -> Dict[str, float]:
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in prefetch_to_device(pipe.eval_batches(), sharding):
    out = jax.device_get(eval_step(trainable, frozen, batch))
    for k in totals:
      totals[k] += float(out[k])
  return {"top1": totals["correct"] / totals["count"], "loss": totals["loss_sum"] / totals["count"],
          "count": totals["count"]}


def _pruned_count(variables: Tree, trainable: Tree) -> Optional[int]:
  """The real trainable count of E2VPT-pruned prompts (masked-off entries are not parameters)."""
  masks = variables.get("prompt_masks")
  if masks is None:
    return None
  from vpt_jax import pruning  # pylint: disable=g-import-not-at-top
  m = jax.device_get(masks["hooks"])
  return pruning.pruned_count(trainable, {"tokens": m["token_mask"], "segments": m["segment_mask"]})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains what the config's rule selects, evaluates, checkpoints; returns the results dict.

  Restarted with the same config and workdir, a run continues from its last checkpoint and ends
  with bit-identical trainable parameters (the input order is a function of seed and step).
  """
  # pylint: disable=g-import-not-at-top; these pull in TensorFlow and orbax, the steps do not.
  from vpt_jax import builder, checkpointing, features
  from vpt_jax.data import pipeline, sources
  from vpt_jax.metrics import MetricWriter, Progress
  t_start = time.time()
  lead = jax.process_index() == 0
  say = (lambda *a: print(*a, flush=True)) if lead else (lambda *a: None)

  # Everything is checked before any compute.
  config = ml_collections.ConfigDict(config.to_dict())
  builder.check_config(config)
  pipeline.make_preprocess(config.data, 1, train=True)  # data options, before the backbone loads
  if not config.model.num_classes:
    config.model.num_classes = sources.num_classes(config.data)
  built = builder.build(config)
  model = built.model
  image_size = model.image_size[0]
  if model.image_size[0] != model.image_size[1]:
    raise ValueError(f"the input pipeline makes square images; model image_size is "
                     f"{tuple(model.image_size)}")
  pre_train = pipeline.make_preprocess(config.data, image_size, train=True)
  pre_eval = pipeline.make_preprocess(config.data, image_size, train=False)
  d = config.data
  names = [n for n in (d.train_split, d.val_split, d.test_split) if n]
  if not d.train_split:
    raise ValueError("config data.train_split is empty")
  splits = sources.load_splits(d, list(dict.fromkeys(names)))
  pipe_kw = dict(batch_size=config.batch_size, seed=config.seed,
                 process_index=jax.process_index(), process_count=jax.process_count())
  train_pipe = pipeline.Pipeline(splits[d.train_split], pre_train, **pipe_kw)
  eval_pipes = {name: pipeline.Pipeline(splits[s], pre_eval, **pipe_kw)
                for name, s in (("val", d.val_split), ("test", d.test_split)) if s}
  spe = train_pipe.steps_per_epoch
  if spe == 0:
    raise ValueError(f"config batch_size={config.batch_size} is larger than the training split "
                     f"{d.train_split!r} ({len(splits[d.train_split])} examples)")
  total = int(config.optim.epochs * spe)

  replicated, batch_sharding = mesh_shardings()
  trainable, frozen = partition.split(built.variables, built.mask)
  frozen = jax.device_put(frozen, replicated)
  tx, schedule = make_optimizer(config.optim, spe)
  state = jax.device_put(
      create_train_state(trainable, tx, jax.random.PRNGKey(config.seed)), replicated)
  ckpt = checkpointing.Checkpointer(workdir, built.fingerprint(), keep=config.keep_checkpoints)
  restored = ckpt.restore(state)
  if restored is not None:
    state = jax.device_put(restored, replicated)
    say(f"resuming from {workdir}/checkpoints/last at step {int(state.step)}")
  if lead:
    checkpointing.write_config(workdir, config)
  report = partition.param_report(built.variables, built.mask,
                                  trainable_count=_pruned_count(built.variables, trainable))
  say(f"model: {model.depth} layers, width {model.width}, {config.model.num_classes} classes; "
      f"protocol {config.protocol}: {report['trainable']:,} trainable parameters "
      f"({report['trainable_percent_of_backbone']:.3f}% of the {report['backbone']:,} backbone); "
      f"{len(splits[d.train_split])} training examples, {spe} steps/epoch, {total} steps")

  # The cached-features path: the frozen layers before the first trainable part run once per image.
  pipes = {"train": train_pipe, **eval_pipes}
  cache = features.plan(model, built.mask, mode=config.get("cache_features", "auto"),
                        deterministic=getattr(pre_train, "deterministic", False),
                        num_examples=sum(len(p.split) for p in pipes.values()),
                        process_count=jax.process_count())
  step_model = model
  if cache.layer:
    t0 = time.time()
    step_model, pipes, nbytes = features.cache_pipelines(model, cache.layer, built.variables, pipes)
    train_pipe = pipes.pop("train")
    eval_pipes = pipes
    say(features.describe(cache, model.depth, f"{nbytes / 2**20:.0f} MiB of token sequences "
                                              f"computed in {time.time() - t0:.1f} s"))
  else:
    say(features.describe(cache, model.depth))

  train_step = jax.jit(make_train_step(step_model, tx, schedule), donate_argnums=(0,),
                       in_shardings=(replicated, replicated, batch_sharding),
                       out_shardings=(replicated, replicated))
  eval_step = jax.jit(make_eval_step(step_model),
                      in_shardings=(replicated, replicated, batch_sharding),
                      out_shardings=replicated)
  writer = MetricWriter(workdir, enabled=lead)
  start = int(state.step)
  progress = Progress(total, spe, config.batch_size, start, enabled=lead)
  sums: Dict[str, float] = {}
  best_val = None
  last_good = ckpt.latest_step()

  def check(step: int, metrics) -> None:
    host = jax.device_get(metrics)
    if not np.isfinite(host["loss"]):
      ckpt.wait()
      raise FloatingPointError(
          f"loss is {host['loss']} at step {step} (epoch {(step - 1) // spe + 1}); stopping. "
          + (f"The last good checkpoint (step {last_good}) is in {workdir}/checkpoints/last."
             if last_good is not None else "No checkpoint had been saved yet.")
          + " Lower optim.lr or check the data.")
    for k, v in host.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    sums["_n"] = sums.get("_n", 0.0) + 1

  pending = None
  batches = prefetch_to_device(train_pipe.train_batches(start), batch_sharding)
  try:
    for step in range(start, total):
      state, metrics = train_step(state, frozen, next(batches))
      if pending is not None:
        check(*pending)  # checked one step late, so the host never stalls the device
      pending = (step + 1, metrics)
      s = step + 1
      epoch_end = s % spe == 0
      save_now = (epoch_end if not config.checkpoint_every_steps
                  else s % config.checkpoint_every_steps == 0) or s == total
      if s % config.log_every_steps == 0 or epoch_end or save_now:
        check(*pending)
        pending = None
      if s == start + 1:
        progress.restart_clock(s)  # the first step includes compilation
      if (s % config.log_every_steps == 0 or s == total) and sums.get("_n"):
        means = {k: v / sums["_n"] for k, v in sums.items() if k != "_n"}
        progress.line(s, means)
        writer.write(s, {f"train/{k}": v for k, v in means.items()})
        sums.clear()
      val_top1 = None
      every = config.eval_every_epochs
      if "val" in eval_pipes and epoch_end and every and (s // spe) % every == 0:
        val = evaluate(eval_step, state.trainable, frozen, eval_pipes["val"], batch_sharding)
        val_top1 = val["top1"]
        best_val = val_top1 if best_val is None else max(best_val, val_top1)
        writer.write(s, {"val/top1": val["top1"], "val/loss": val["loss"]})
        say(f"step {s}: validation top-1 {val['top1']:.4f} (loss {val['loss']:.4f})")
        progress.restart_clock(s)
      if save_now or val_top1 is not None:
        ckpt.save(state, val_top1)
        last_good = s
    if pending is not None:
      check(*pending)
    ckpt.wait()

    results: Dict[str, Any] = {}
    for name, pipe in eval_pipes.items():
      r = evaluate(eval_step, state.trainable, frozen, pipe, batch_sharding)
      results[f"{name}_top1"] = r["top1"]
      results[f"{name}_loss"] = r["loss"]
      writer.write(total, {f"{name}/top1": r["top1"], f"{name}/loss": r["loss"]})
    results.update({
        "best_val_top1": best_val,
        "trainable_params": report["trainable"],
        "trainable_percent_of_backbone": report["trainable_percent_of_backbone"],
        "backbone_params": report["backbone"],
        "per_task_multiple": report["per_task_multiple"],
        "cached_features_layer": cache.layer or None,
        "steps": total, "epochs": config.optim.epochs,
        "devices": jax.device_count(), "hosts": jax.process_count(),
        "wall_time_s": time.time() - t_start,
        "config": config.to_dict(),
    })
    if lead:
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
      say("results: " + ", ".join(f"{k} {results[k]:.4f}" for k in ("val_top1", "test_top1")
                                  if k in results))
    return results
  finally:
    writer.close()
    ckpt.close()
