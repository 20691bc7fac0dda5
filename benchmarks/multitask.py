"""Throughput of one backbone serving a mixed batch of K tasks vs a single-task batch.

    python benchmarks/multitask.py                      # demo backbone and a random ViT-B/16
    python benchmarks/multitask.py --models=demo        # seconds

Prints one JSON line. For each model: images/s of (a) the plain VPT-deep model of one task
(`prompts.attach`, what a single-task server runs), (b) `serving.MultiTaskServer` on a batch of
that one task, and (c) the same server on a batch whose examples are spread over K tasks with
different class counts (per-example prompt and head gathers). Target (issue 8): mixed >= 0.9x
single. Weights of ViT-B/16 are random (the cost does not depend on them); the demo model is the
shipped `demo-vit`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

import vpt_jax
from vpt_jax import prompts, serving
from vpt_jax.weights.npz import Architecture

CLASSES = (10, 37, 100, 397, 47, 102, 2, 200)   # a spread of VTAB-like class counts


def backbone(name: str):
  if name == "demo":
    return vpt_jax.load_pretrained("demo-vit", num_classes=10)
  arch = Architecture(patch_size=(16, 16), in_channels=3, width=768, depth=12, num_heads=12,
                      mlp_dim=3072, grid=(14, 14), pool_type="token", class_token=True,
                      posemb_cls_row=True, representation_size=None, num_classes=10)
  model = arch.model()
  x = jnp.zeros((1, *arch.image_size, 3), jnp.float32)
  return model, jax.jit(model.init)(jax.random.PRNGKey(0), x)


def images_per_s(fns: Dict[str, Callable[[], jax.Array]], batch: int, reps: int) -> Dict[str, float]:
  """Median images/s of each no-argument call; calls are interleaved so that load from other
  processes on the machine hits them all alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())   # compile + warm-up
  times: Dict[str, list] = {k: [] for k in fns}
  for _ in range(reps):
    for k, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t)
  return {k: batch / float(np.median(v)) for k, v in times.items()}


def measure(name: str, tasks: int, batch: int, length: int, reps: int) -> Dict[str, float]:
  base, variables = backbone(name)
  rng = np.random.default_rng(0)
  cfg = prompts.default_config()
  cfg.length, cfg.deep = length, True
  models, task_list = [], []
  for t in range(tasks):
    c = CLASSES[t % len(CLASSES)]
    model = prompts.attach(base.clone(num_classes=c), cfg)
    params = {**variables["params"],
              "head": {"kernel": jnp.asarray(rng.normal(size=(base.width, c)) * 0.01, jnp.float32),
                       "bias": jnp.zeros((c,), jnp.float32)}}
    v = {"params": params, "prompts": prompts.init_prompts(model, jax.random.PRNGKey(t))}
    models.append((model, v))
    task_list.append(serving.task_from_model(f"task{t}", model, v))
  server = serving.MultiTaskServer.from_tasks(base, variables["params"], task_list)
  images = jnp.asarray(rng.uniform(-1, 1, (batch, *base.image_size, 3)), jnp.float32)
  single_model, single_vars = models[0]
  single_apply = jax.jit(single_model.apply)
  mixed_ids = jnp.asarray(np.arange(batch) % tasks, jnp.int32)
  one_ids = jnp.zeros((batch,), jnp.int32)
  rates = images_per_s({"single": lambda: single_apply(single_vars, images),
                        "server_one": lambda: server(images, one_ids),
                        "mixed": lambda: server(images, mixed_ids)}, batch, reps)
  single, server_one, mixed = rates["single"], rates["server_one"], rates["mixed"]
  # Exactness on this batch, for the record: the mixed batch's task-0 rows equal the plain model.
  rows = np.flatnonzero(np.asarray(mixed_ids) == 0)
  err = float(np.max(np.abs(np.asarray(server(images, mixed_ids))[rows, :single_model.num_classes]
                            - np.asarray(single_apply(single_vars, images))[rows])))
  return {"tasks": tasks, "batch": batch, "prompt_length": length,
          "image_size": list(base.image_size), "width": base.width, "depth": base.depth,
          "single_task_model_img_s": round(single, 2), "server_one_task_img_s": round(server_one, 2),
          "server_mixed_img_s": round(mixed, 2),
          "mixed_vs_single_task_model": round(mixed / single, 3),
          "mixed_vs_server_one_task": round(mixed / server_one, 3),
          "max_abs_diff_vs_single_model": err}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="demo,vit-b16", help="comma list of demo, vit-b16")
  ap.add_argument("--tasks", type=int, default=4)
  ap.add_argument("--reps", type=int, default=0, help="timed calls (0 = per model default)")
  args = ap.parse_args()
  settings = {"demo": dict(batch=256, length=8, reps=30), "vit-b16": dict(batch=8, length=50, reps=5)}
  out = {"benchmark": "multitask", "backend": jax.default_backend(),
         "device": jax.devices()[0].device_kind, "machine": platform.machine(), "results": {}}
  for name in args.models.split(","):
    s = dict(settings[name])
    if args.reps:
      s["reps"] = args.reps
    out["results"][name] = measure(name, args.tasks, s["batch"], s["length"], s["reps"])
  print(json.dumps(out))


if __name__ == "__main__":
  main()
