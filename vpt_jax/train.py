"""Optimizer, train state and the jitted steps; gradients only for what trains.

The variables are split once by the trainable rule (`vpt_jax.partition`). The train step takes the
trainable tree as the differentiated argument and the frozen tree as a plain input, so XLA never
forms a gradient for a frozen weight: for VPT the backward pass only propagates activation
gradients down to the prompts (~2x the forward FLOPs instead of ~3x). Everything that reads
gradients (global norm for logging, clipping, the optimizer) sees the trainable tree only.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Mapping, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
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
