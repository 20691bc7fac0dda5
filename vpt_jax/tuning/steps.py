"""Train state and the jitted steps; gradients only for what trains.

The variables are split once by the trainable rule (`vpt_jax.tuning.rules`). The train step takes
the trainable tree as the differentiated argument and the frozen tree as a plain input, so XLA never
forms a gradient for a frozen weight: for VPT the backward pass only propagates activation
gradients down to the prompts (~2x the forward FLOPs instead of ~3x). Everything that reads
gradients (global norm for logging, clipping, the optimizer) sees the trainable tree only.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vpt_jax.tasks.classification import cross_entropy
from vpt_jax.tuning import rules

Tree = Dict[str, Any]


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


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean over the rows with mask 1 (all rows without a mask): padding rows contribute nothing."""
  if mask is None:
    return values.mean()
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def make_loss_fn(model: Any) -> Callable:
  """loss(trainable, frozen, images, labels, rng, mask=None) -> (mean loss, logits).

  `mask` (1 = real example) excludes the padding rows of an epoch's last, partial batch, so the
  gradient is the one of the real examples alone (the official loader's smaller last batch).
  """

  def loss_fn(trainable, frozen, images, labels, rng, mask=None):
    variables = rules.merge(trainable, frozen)
    logits = model.apply(variables, images, train=True, rngs={"dropout": rng})
    return masked_mean(cross_entropy(logits, labels), mask), logits
  return loss_fn


def make_train_step(model: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None) -> Callable:
  """train_step(state, frozen, batch) -> (state, metrics); jit it (donating the state)."""
  grad_fn = jax.value_and_grad(make_loss_fn(model), has_aux=True)

  def train_step(state: TrainState, frozen: Tree, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    mask = batch.get("mask")
    (loss, logits), grads = grad_fn(state.trainable, frozen, batch["image"], batch["label"], rng,
                                    mask)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {
        "loss": loss,
        "accuracy": masked_mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32),
                                mask),
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
    logits = model.apply(rules.merge(trainable, frozen), batch["image"])
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
            "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}
  return eval_step


# ------------------------------------------------------------------------------------------------
# Devices: one mesh, batches prefetched onto it, evaluation over padded batches.


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


def evaluate(eval_step: Callable, trainable: Tree, frozen: Tree, pipe,
             sharding) -> Dict[str, float]:
  totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
  for batch in prefetch_to_device(pipe.eval_batches(), sharding):
    out = jax.device_get(eval_step(trainable, frozen, batch))
    for k in totals:
      totals[k] += float(out[k])
  return {"top1": totals["correct"] / totals["count"], "loss": totals["loss_sum"] / totals["count"],
          "count": totals["count"]}
