"""What a train step costs, per protocol: XLA FLOPs, compiled memory, measured images/s.

    python benchmarks/step_cost.py                 # tiny model and ViT-B/16 at 224, batch 8, 64
    python benchmarks/step_cost.py --models=tiny   # seconds, for a quick look
    python benchmarks/step_cost.py --models=vit-b16 --batch=64 --paths=fast \
        --protocols=vpt_deep_p50,linear --steps=1 --rounds=2   # the issue-19 batch-64 figure

Prints one JSON line. For each model, protocol (VPT-shallow p=50, VPT-deep p=50, full
fine-tuning, linear probe = the plain ViT's forward) and execution path (`fast`: compute only
what the output needs; `straightforward`: every row of every layer): forward and train-step FLOPs
from XLA's cost analysis (the step includes the gradient-norm logging the trainer does), their ratio, the compiled step's memory, images/s over
timed steps, and the FLOP/s achieved, as a fraction of the machine's large-matmul FLOP/s measured
in the same run, round by round (matmul, every step, matmul, every step, ...; medians), because a
shared machine's speed changes during a run. Targets (issue 3): VPT step <= 2.05x its forward
FLOPs. Targets (issue 19): VPT-deep fast step >= 0.85x the matmul rate at batch 8 and 64; the plain
ViT (linear probe) >= 0.9x.
Targets (issue 9): VPT-deep fast forward <= 1.05x the plain ViT's forward FLOPs; VPT-deep fast
train step >= 1.3x the images/s of the straightforward path.
Weights are random (the cost does not depend on them), so no checkpoint is downloaded.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax import prompts
from vpt_jax.tuning import optim, rules, steps
from vpt_jax.weights.npz import Architecture

MODELS = {
    "tiny": Architecture(patch_size=(4, 4), in_channels=3, width=64, depth=2, num_heads=4,
                         mlp_dim=128, grid=(8, 8), pool_type="token", class_token=True,
                         posemb_cls_row=True, representation_size=None, num_classes=10),
    "vit-b16": Architecture(patch_size=(16, 16), in_channels=3, width=768, depth=12,
                            num_heads=12, mlp_dim=3072, grid=(14, 14), pool_type="token",
                            class_token=True, posemb_cls_row=True, representation_size=None,
                            num_classes=100),
    "vit-s16": Architecture(patch_size=(16, 16), in_channels=3, width=384, depth=12,
                            num_heads=6, mlp_dim=1536, grid=(14, 14), pool_type="token",
                            class_token=True, posemb_cls_row=True, representation_size=None,
                            num_classes=100),
}
PROTOCOLS = {
    "vpt_shallow_p50": ("vpt", dict(length=50, deep=False)),
    "vpt_deep_p50": ("vpt", dict(length=50, deep=True)),
    "full": ("full", None),
    "linear": ("linear", None),
}
PATHS = {"fast": True, "straightforward": False}


def matmul_flops_per_s(n: int = 4096, reps: int = 5) -> float:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(a, a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def build(arch: Architecture, protocol: str, prompt_kw, batch: int, fast: bool) -> dict:
  """The compiled forward and train step of one protocol and path, with their arguments."""
  model = arch.model(fast_path=fast)
  if prompt_kw is not None:
    cfg = prompts.default_config()
    cfg.update(prompt_kw)
    model = prompts.attach(model, cfg)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, *arch.image_size, 3)),
                       jnp.float32)
  labels = jnp.asarray(np.arange(batch) % arch.num_classes, jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images[:1])
  mask = rules.label(variables, rules.protocol_patterns(protocol))
  trainable, frozen = rules.split(variables, mask)
  ocfg = optim.default_optim_config()
  tx, schedule = optim.make_optimizer(ocfg, steps_per_epoch=100)
  state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(1))
  batch_d = {"image": images, "label": labels}

  fwd = jax.jit(lambda t, f, x: model.apply(rules.merge(t, f), x)).lower(
      trainable, frozen, images).compile()
  step = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=(0,)).lower(
      state, frozen, batch_d).compile()
  return {"fwd": fwd, "step": step, "step_args": (state, frozen, batch_d),
          "trainable": trainable}


def static_cost(built: dict) -> dict:
  """XLA's FLOPs and compiled memory of one built protocol (load-independent figures)."""
  fwd_flops = built["fwd"].cost_analysis()["flops"]
  step_flops = built["step"].cost_analysis()["flops"]
  mem = built["step"].memory_analysis()
  return {
      "trainable_params": rules.count(built["trainable"]),
      "fwd_gflops": round(fwd_flops / 1e9, 3),
      "step_gflops": round(step_flops / 1e9, 3),
      "step_over_fwd": round(step_flops / fwd_flops, 4),
      "temp_mib": round(mem.temp_size_in_bytes / 2 ** 20, 1),
      "args_mib": round(mem.argument_size_in_bytes / 2 ** 20, 1),
  }


def time_steps(built: dict, n_steps: int) -> float:
  """Seconds per train step over `n_steps` steps (the state carried on, as the trainer does)."""
  state, frozen, batch_d = built["step_args"]
  t = time.perf_counter()
  for _ in range(n_steps):
    state, m = built["step"](state, frozen, batch_d)
  jax.block_until_ready(m)
  built["step_args"] = (state, frozen, batch_d)
  return (time.perf_counter() - t) / n_steps


def measure(arch: Architecture, keys, batch: int, n_steps: int, rounds: int) -> dict:
  """Every (protocol, path) of `keys` at one batch size, timed in interleaved rounds.

  A round times the large matmul and then each step; a step's `achieved_over_matmul` is the
  median over rounds of its FLOP/s over the same round's matmul FLOP/s, so a machine whose load
  changes during the run (other processes) compares each step with the rate it had meanwhile.
  """
  built, res = {}, {}
  for p, path in keys:
    proto, kw = PROTOCOLS[p]
    built[(p, path)] = build(arch, proto, kw, batch, PATHS[path])
    res[f"{p}/{path}"] = static_cost(built[(p, path)])
    time_steps(built[(p, path)], 1)  # warm-up
  times = {k: [] for k in built}
  ratios = {k: [] for k in built}
  rates = []
  for _ in range(rounds):
    rate = matmul_flops_per_s(reps=2)
    rates.append(rate)
    for k, b in built.items():
      dt = time_steps(b, n_steps)
      times[k].append(dt)
      ratios[k].append(res[f"{k[0]}/{k[1]}"]["step_gflops"] * 1e9 / dt / rate)
  for (p, path), b in built.items():
    dt = statistics.median(times[(p, path)])
    r = res[f"{p}/{path}"]
    r.update({"step_s": round(dt, 4), "images_per_s": round(batch / dt, 2),
              "achieved_gflops_per_s": round(r["step_gflops"] / dt, 1),
              "achieved_over_matmul": round(statistics.median(ratios[(p, path)]), 3),
              "achieved_over_matmul_rounds": [round(x, 3) for x in ratios[(p, path)]]})
  res["matmul_gflops_per_s_rounds"] = [round(x / 1e9, 1) for x in rates]
  return res


def ratios(res: dict, paths) -> None:
  """The fast path's FLOP and speed ratios (issues 3 and 9), added to `res`."""
  for path in paths:
    if f"vpt_deep_p50/{path}" in res and f"linear/{path}" in res:
      res[f"deep_fwd_over_plain_fwd/{path}"] = round(
          res[f"vpt_deep_p50/{path}"]["fwd_gflops"] / res[f"linear/{path}"]["fwd_gflops"], 4)
  if {"vpt_deep_p50/fast", "vpt_deep_p50/straightforward", "linear/straightforward"} <= set(res):
    deep_f, deep_s = res["vpt_deep_p50/fast"], res["vpt_deep_p50/straightforward"]
    res["deep_fast_fwd_over_plain_straightforward_fwd"] = round(
        deep_f["fwd_gflops"] / res["linear/straightforward"]["fwd_gflops"], 4)
    res["deep_fast_over_straightforward_images_per_s"] = round(
        deep_f["images_per_s"] / deep_s["images_per_s"], 3)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="tiny,vit-b16")
  ap.add_argument("--batch", default="8,64", help="batch sizes, comma-separated")
  ap.add_argument("--steps", type=int, default=2, help="timed steps per round")
  ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (matmul, steps)")
  ap.add_argument("--paths", default="fast,straightforward")
  ap.add_argument("--protocols", default=",".join(PROTOCOLS))
  args = ap.parse_args()
  out = {"benchmark": "step_cost", "device": str(jax.devices()[0].device_kind),
         "backend": jax.default_backend(), "host": platform.node(), "models": {}}
  paths = args.paths.split(",")
  keys = [(p, path) for path in paths for p in args.protocols.split(",")]
  for name in args.models.split(","):
    out["models"][name] = {}
    for batch in (int(b) for b in args.batch.split(",")):
      res = measure(MODELS[name], keys, batch, args.steps, args.rounds)
      ratios(res, paths)
      out["models"][name][f"batch_{batch}"] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
