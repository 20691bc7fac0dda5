"""Run by tests/test_memory.py in a subprocess with 8 CPU devices (XLA_FLAGS set by the test).

Prepares the demo VPT-deep run three times through the trainer's own code (`loop.prepare`,
`loop._jit_steps`): model.frozen_sharding 'replicated' and 'sharded', and replicated with
microbatch_size=2 (each device's 8 rows in 4 chunks); trains a few steps and prints one JSON line:
per-device bytes of the frozen tree, the largest differences of the logits and the trained
prompts from the replicated run's, and the collectives of the microbatched step.
"""

import json
import sys

import jax
import numpy as np

from configs import demo
from vpt_jax.tuning import loop, memory, rules, steps

STEPS = 4


def run(kind: str, workdir: str, microbatch: int = 0):
  config = demo.get_config("vpt-deep,model.checkpoint=tiny-random,optim.epochs=1,"
                           f"optim.warmup_epochs=0,model.frozen_sharding={kind},"
                           f"microbatch_size={microbatch or 64}")
  r = loop.prepare(config, workdir)
  assert loop.microbatch(r) == microbatch
  train_step, _ = loop._jit_steps(r)
  batches = steps.prefetch_to_device(r.train_pipe.train_batches(0), r.shardings[1])
  for _ in range(STEPS):
    r.state, _ = train_step(r.state, r.frozen, next(batches))
  batch = next(batches)
  apply = lambda s, f, x: r.model.apply(rules.merge(s.trainable, f), x)
  logits = jax.jit(memory.gathered(apply, r.frozen_sharding, r.shardings[0]))(
      r.state, r.frozen, batch["image"])
  specs = sorted({str(s.spec) for s in jax.tree.leaves(r.frozen_sharding)})
  collectives = None
  if kind == "replicated":  # compared between the whole-batch and the microbatched step
    hlo = train_step.lower(r.state, r.frozen, batch).compile().as_text()
    collectives = sorted({c for c in ("all-reduce", "all-gather", "all-to-all",
                                      "collective-permute", "reduce-scatter")
                          if f" {c}(" in hlo or f" {c}-start(" in hlo})
  out = (np.asarray(logits), jax.device_get(r.state.trainable), memory.device_bytes(r.frozen),
         specs, collectives)
  r.ckpt.close()
  return out


def main(tmp: str) -> None:
  assert jax.device_count() == 8, jax.device_count()
  rep, shd = run("replicated", f"{tmp}/replicated"), run("sharded", f"{tmp}/sharded")
  mb = run("replicated", f"{tmp}/microbatched", microbatch=2)
  diff = lambda x, y: max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(x),
                                                                      jax.tree.leaves(y)))
  prompts = diff(rep[1], shd[1])
  moved = max(float(np.abs(a).max()) for a in jax.tree.leaves(rep[1]["prompts"]))
  print(json.dumps({"devices": jax.device_count(), "steps": STEPS,
                    "replicated_bytes_per_device": rep[2], "sharded_bytes_per_device": shd[2],
                    "logits_max_diff": float(np.abs(rep[0] - shd[0]).max()),
                    "trainable_max_diff": prompts, "prompts_max_abs": moved,
                    "sharded_specs": shd[3],
                    "microbatched_trainable_max_diff": diff(rep[1], mb[1]),
                    "microbatched_logits_max_diff": float(np.abs(rep[0] - mb[0]).max()),
                    "logits_max_abs": float(np.abs(rep[0]).max()),
                    "microbatched_collectives": mb[4], "whole_batch_collectives": rep[4]}))


if __name__ == "__main__":
  main(sys.argv[1])
