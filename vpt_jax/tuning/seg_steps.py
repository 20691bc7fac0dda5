"""Training a segmenter (`vpt_jax.tasks.segmentation`): its protocols, train state and step.

The backbone's leaves train by the one rule (`vpt_jax.tuning.rules`), with the classification
head's pattern left out (a segmentation backbone has none: `dense_backbone`); the SETR-PUP heads
always train. The state keeps the heads' BatchNorm statistics next to the trainable tree, so
checkpoints (`workdir.Checkpointer`) save and restore them with it.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from vpt_jax.tasks import segmentation as seg
from vpt_jax.tuning import rules

Tree = Dict[str, Any]

# The paper's Table 3 protocols -> names of the one protocol registry (`rules.protocol`).
PROTOCOLS = {"full": "full", "head": "linear", "bias": "bias", "vpt": "vpt", "vpt-deep": "vpt",
             "vpt+bias": "vpt+bias", "e2vpt": "vpt"}


def backbone_patterns(protocol: str) -> List[str]:
  """Trainable-path patterns of the backbone under a segmentation protocol (the heads always
  train). E2VPT's key-value prompts live in 'prompts' too, so 'e2vpt' is 'vpt' with kv prompts;
  'full' trains every backbone weight ('params'), as the paper counts it."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"segmentation protocol {protocol!r}: expected one of {sorted(PROTOCOLS)}")
  patterns = rules.protocol_patterns(PROTOCOLS[protocol])
  return [r"params/.*" if p == r".*" else p for p in patterns
          if not p.startswith("params/head")]


@flax.struct.dataclass
class SegTrainState:
  """`steps.TrainState` plus the heads' BatchNorm running statistics."""

  step: jax.Array
  trainable: Tree          # {'backbone': trainable backbone leaves, 'head': head params}
  opt_state: Any
  rng: jax.Array
  batch_stats: Tree


def create_train_state(trainable: Tree, batch_stats: Tree, tx: optax.GradientTransformation,
                       rng: jax.Array) -> SegTrainState:
  return SegTrainState(step=jnp.zeros((), jnp.int32), trainable=trainable,
                       opt_state=tx.init(trainable), rng=rng, batch_stats=batch_stats)


def make_train_step(segmenter: seg.Segmenter, tx: optax.GradientTransformation, *,
                    ignore_index: int = seg.IGNORE_INDEX, average: str = "all",
                    schedule: optax.Schedule | None = None) -> Callable:
  """step(state, frozen_backbone, batch {'image', 'label'}) -> (state, metrics).

  Only state.trainable (backbone leaves of the protocol, head parameters) is differentiated; the
  frozen backbone leaves are a plain input. Dropout keys: fold_in(state.rng, step).
  """
  def loss_fn(trainable, batch_stats, frozen, batch, rng):
    backbone_vars = rules.merge(trainable["backbone"], frozen)
    head_vars = {"params": trainable["head"], "batch_stats": batch_stats}
    (decode, aux), new = segmenter.apply(backbone_vars, head_vars, batch["image"], train=True,
                                         rngs={"dropout": rng})
    loss, parts = seg.segmentation_loss(decode, aux, batch["label"], segmenter.head,
                                        ignore_index=ignore_index, average=average)
    return loss, (parts, new["batch_stats"])

  def step(state: SegTrainState, frozen: Tree, batch: Mapping[str, jax.Array]):
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, (parts, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.trainable, state.batch_stats, frozen, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
    new = state.replace(step=state.step + 1, trainable=optax.apply_updates(state.trainable,
                                                                           updates),
                        opt_state=opt_state, batch_stats=stats)
    metrics = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads)}
    if schedule is not None:
      metrics["lr"] = schedule(state.step)
    return new, metrics
  return step
