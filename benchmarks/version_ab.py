"""Before/after in one process: the fast VPT-deep train step and plain forward of git revisions.

    python benchmarks/version_ab.py a675cef HEAD                 # ViT-S/16, batch 8, 6 rounds
    python benchmarks/version_ab.py --model=vit-b16 --rounds=4 a675cef HEAD

Each revision's `vpt_jax` is exported (`git archive`) into a temporary folder under its own
package name, so all of them are compiled in one process and timed in interleaved rounds (the
large matmul, then every function once); a shared machine's load then hits every version alike.
Prints one JSON line: per version and function, the median seconds and the median over rounds of
(FLOP/s achieved / the same round's matmul FLOP/s). Weights are random.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_cost  # noqa: E402


def export(rev: str, root: str, name: str) -> None:
  """`vpt_jax` of git revision `rev` as package `name` under `root` (imports renamed)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(root, name + ".tar")
  with open(path, "wb") as f:
    subprocess.run(["git", "-C", repo, "archive", rev, "vpt_jax"], stdout=f, check=True)
  with tarfile.open(path) as t:
    t.extractall(os.path.join(root, "_" + name))
  os.rename(os.path.join(root, "_" + name, "vpt_jax"), os.path.join(root, name))
  for d, _, files in os.walk(os.path.join(root, name)):
    for fn in files:
      if fn.endswith(".py"):
        p = os.path.join(d, fn)
        with open(p) as f:
          text = f.read()
        with open(p, "w") as f:
          f.write(re.sub(r"\bvpt_jax\b", name, text))


def build(ver: str, protocol: str, kw, model_name: str, batch: int):
  """(compiled function, its arguments, whether it donates the state): the VPT-deep train step,
  or the plain ViT's forward (linear probing, feature caching) when `kw` is None."""
  mod = lambda m: importlib.import_module(f"{ver}.{m}")
  prompts, optim, rules, steps = (mod(m) for m in ("prompts", "tuning.optim", "tuning.rules",
                                                   "tuning.steps"))
  a = step_cost.MODELS[model_name]
  arch = mod("weights.npz").Architecture(**{f: getattr(a, f) for f in a.__dataclass_fields__})
  model = arch.model(fast_path=True)
  if kw is not None:
    cfg = prompts.default_config()
    cfg.update(kw)
    model = prompts.attach(model, cfg)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, *arch.image_size, 3)),
                       jnp.float32)
  labels = jnp.asarray(np.arange(batch) % arch.num_classes, jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  if kw is None:
    f = jax.jit(model.apply).lower(variables, images).compile()
    return f, (variables, images), False
  trainable, frozen = rules.split(variables, rules.label(variables,
                                                         rules.protocol_patterns(protocol)))
  tx, sch = optim.make_optimizer(optim.default_optim_config(), steps_per_epoch=100)
  state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(1))
  b = {"image": images, "label": labels}
  step = jax.jit(steps.make_train_step(model, tx, sch), donate_argnums=(0,))
  return step.lower(state, frozen, b).compile(), [state, frozen, b], True


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("revs", nargs="+", help="git revisions, e.g. a675cef HEAD")
  ap.add_argument("--model", default="vit-s16")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=6)
  args = ap.parse_args()
  MODEL, BATCH, ROUNDS = args.model, args.batch, args.rounds
  root = tempfile.mkdtemp(prefix="version_ab_")
  atexit.register(shutil.rmtree, root, True)
  VERS = []
  for i, rev in enumerate(args.revs):
    VERS.append(f"v{i}_" + re.sub(r"\W", "_", rev))
    export(rev, root, VERS[-1])
  sys.path.insert(0, root)
  fns = {}
  for ver in VERS:
    for p, kw in (("deep", dict(length=50, deep=True)), ("plain_fwd", None)):
      fns[(ver, p)] = build(ver, "vpt" if kw else "linear", kw, MODEL, BATCH)
  flops = {k: f.cost_analysis()["flops"] for k, (f, a, d) in fns.items()}

  def run(k):
    f, args_, donate = fns[k]
    t = time.perf_counter()
    out = f(*args_)
    jax.block_until_ready(out)
    if donate:
      args_[0] = out[0]
    return time.perf_counter() - t

  for k in fns:
    run(k)
  ratios = {k: [] for k in fns}
  times = {k: [] for k in fns}
  rates = []
  for _ in range(ROUNDS):
    m = step_cost.matmul_flops_per_s(reps=2)
    rates.append(m)
    for k in fns:
      dt = run(k)
      times[k].append(dt)
      ratios[k].append(flops[k] / dt / m)
  out = {"benchmark": "version_ab", "model": MODEL, "batch": BATCH, "rounds": ROUNDS,
         "revs": dict(zip(VERS, args.revs)),
         "matmul_gflops_per_s": [round(x / 1e9, 1) for x in rates]}
  for k in fns:
    out["/".join(k)] = {"gflops": round(flops[k] / 1e9, 2),
                        "median_s": round(statistics.median(times[k]), 4),
                        "achieved_over_matmul_median": round(statistics.median(ratios[k]), 3),
                        "rounds": [round(x, 3) for x in ratios[k]]}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
