"""Train state and the jitted steps; gradients only for what trains.

The variables are split once by the trainable rule (`vpt_jax.tuning.rules`). The train step takes
the trainable tree as the differentiated argument and the frozen tree as a plain input, so XLA never
forms a gradient for a frozen weight: for VPT the backward pass only propagates activation
gradients down to the prompts (~2x the forward FLOPs instead of ~3x). Everything that reads
gradients (global norm for logging, clipping, the optimizer) sees the trainable tree only.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, Mapping, Optional

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
  """loss(trainable, frozen, images, labels, rng, mask=None, count=None) -> (mean loss, logits).

  `mask` (1 = real example) excludes the padding rows of an epoch's last, partial batch, so the
  gradient is the one of the real examples alone (the official loader's smaller last batch).
  `count`: divide the masked sum by this (a whole batch's real examples) instead of taking these
  rows' mean: a microbatch's losses then add up over the chunks to the batch's mean loss, and so
  do their gradients.
  """

  def loss_fn(trainable, frozen, images, labels, rng, mask=None, count=None):
    variables = rules.merge(trainable, frozen)
    logits = model.apply(variables, images, train=True, rngs={"dropout": rng})
    losses = cross_entropy(logits, labels)
    if count is None:
      return masked_mean(losses, mask), logits
    return jnp.sum(losses * mask) / count, logits
  return loss_fn


# `microbatch_size=0` (auto) on a CPU: chunks whose largest activation (a layer's MLP hidden or
# attention weights) is about this big. Measured on a 2-core AVX2 host, batch 64
# (`python benchmarks/step_cost.py --models=vit-s16,vit-b16 --batch=64 --microbatch=0,4,8,16`):
# the VPT-deep step of ViT-S/16 ran at 0.49 of the large-matmul rate unchunked and 0.87-0.89 in
# chunks of 4-8 rows; the ViT-B/16 forward at 0.79 and 0.98. Accelerators keep whole batches.
CPU_CHUNK_BYTES = 16 * 2 ** 20


def auto_microbatch(setting: int, bytes_per_row: Optional[int], platform: str) -> int:
  """Rows per device per chunk (0: the whole per-device batch at once) for `microbatch_size`."""
  if setting > 0:
    return setting
  if platform != "cpu" or not bytes_per_row:
    return 0
  return max(1, CPU_CHUNK_BYTES // bytes_per_row)


def num_chunks(rows_per_device: int, microbatch: int) -> int:
  """How many chunks a device's `rows_per_device` rows are cut into: the fewest that make each
  at most `microbatch` rows and divide the rows evenly (1: no chunking)."""
  if microbatch <= 0 or rows_per_device <= microbatch:
    return 1
  return next(n for n in range(-(-rows_per_device // microbatch), rows_per_device + 1)
              if rows_per_device % n == 0)


def map_in_chunks(fn: Callable, x: jax.Array, microbatch: int) -> Any:
  """`fn` over the rows of `x` (on one device) in chunks of at most `microbatch` rows, one after
  the other, the outputs' rows concatenated in order (0: all rows at once)."""
  n = num_chunks(x.shape[0], microbatch)
  if n == 1:
    return fn(x)
  out = jax.lax.map(fn, _chunked(x, n, devices=1))
  return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), out)


def _chunked(x: jax.Array, n: int, devices: int) -> jax.Array:
  """(B, ...) -> (n, B / n, ...), chunk k holding rows k*m..(k+1)*m-1 of every device's shard.

  The batch is sharded over the devices in contiguous blocks of B / devices rows; taking each
  chunk from every block keeps every row on its device (no communication), and each chunk stays
  split evenly over the devices.
  """
  b = x.shape[0] // devices
  y = x.reshape((devices, n, b // n) + x.shape[1:])
  return jnp.swapaxes(y, 0, 1).reshape((n, devices * (b // n)) + x.shape[1:])


def make_train_step(model: Any, tx: optax.GradientTransformation,
                    schedule: optax.Schedule | None = None, *, microbatch: int = 0,
                    devices: int = 1) -> Callable:
  """train_step(state, frozen, batch) -> (state, metrics); jit it (donating the state).

  `microbatch` > 0 runs each device's rows in chunks of at most that many rows, one after the
  other, summing the chunks' gradients (the same gradient up to float rounding). On CPUs the
  whole step then works on cache-sized activations: a ViT's matmuls over 64 images run at a
  fraction of the rate they reach over 8 (benchmarks/step_cost.py). `devices`: how many devices
  the batch is split over (the chunks are cut from each device's rows).
  """
  grad_fn = jax.value_and_grad(make_loss_fn(model), has_aux=True)

  def grads_and_metrics(trainable, frozen, batch, rng):
    images, labels = batch["image"], batch["label"]
    mask = batch.get("mask")
    n = num_chunks(images.shape[0] // devices, microbatch)
    if n == 1:
      (loss, logits), grads = grad_fn(trainable, frozen, images, labels, rng, mask)
      correct = masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)
      return loss, correct, grads
    mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask
    count = jnp.maximum(jnp.sum(mask), 1.0)
    xs = jax.tree.map(lambda x: _chunked(x, n, devices), (images, labels, mask))

    def body(carry, chunk):
      k, loss, correct, grads = carry
      x, y, m = chunk
      (l, logits), g = grad_fn(trainable, frozen, x, y, jax.random.fold_in(rng, k), m, count)
      c = jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32) * m)
      return (k + 1, loss + l, correct + c, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    init = (jnp.zeros((), jnp.int32), jnp.zeros(()), jnp.zeros(()), zeros)
    (_, loss, correct, grads), _ = jax.lax.scan(body, init, xs)
    return loss, correct / count, grads

  def train_step(state: TrainState, frozen: Tree, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, accuracy, grads = grads_and_metrics(state.trainable, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state), metrics
  return train_step


def make_eval_step(model: Any, *, microbatch: int = 0, devices: int = 1) -> Callable:
  """eval_step(trainable, frozen, batch) -> sums of loss and correct over the unmasked examples.

  `batch['mask']` (optional, 1 = real example) lets the last, padded batch count correctly.
  `microbatch`, `devices`: as for `make_train_step` (the forward in chunks, one after the other).
  """

  def sums(variables, images, labels, mask):
    logits = model.apply(variables, images)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {"loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
            "correct": jnp.sum(correct * mask), "count": jnp.sum(mask)}

  def eval_step(trainable: Tree, frozen: Tree, batch: Mapping[str, jax.Array]):
    variables = rules.merge(trainable, frozen)
    mask = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
    args = (batch["image"], batch["label"], mask)
    n = num_chunks(args[0].shape[0] // devices, microbatch)
    if n == 1:
      return sums(variables, *args)
    per_chunk = jax.lax.map(lambda a: sums(variables, *a),
                            jax.tree.map(lambda x: _chunked(x, n, devices), args))
    return jax.tree.map(lambda x: jnp.sum(x, 0), per_chunk)
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
