"""What a train step costs, per protocol: XLA FLOPs, compiled memory, measured images/s.

    python benchmarks/step_cost.py                 # tiny model and ViT-B/16 at 224, batch 8
    python benchmarks/step_cost.py --models=tiny   # seconds, for a quick look

Prints one JSON line. For each model, protocol (VPT-shallow p=50, VPT-deep p=50, full
fine-tuning, linear probe = the plain ViT's forward) and execution path (`fast`: compute only
what the output needs; `straightforward`: every row of every layer): forward and train-step FLOPs
from XLA's cost analysis (the step includes the gradient-norm logging the trainer does), their ratio, the compiled step's memory, images/s over
timed steps, and the FLOP/s achieved; plus the machine's large-matmul FLOP/s measured in the same
run. Targets (issue 3): VPT step <= 2.05x its forward FLOPs; achieved >= 80% of the matmul FLOP/s.
Targets (issue 9): VPT-deep fast forward <= 1.05x the plain ViT's forward FLOPs; VPT-deep fast
train step >= 1.3x the images/s of the straightforward path.
Weights are random (the cost does not depend on them), so no checkpoint is downloaded.

Swin (issue 16), `--models=swin-tiny,swin-b`: the plain Swin (linear probe = head only; full
fine-tuning) next to VPT-shallow, VPT-deep and E2VPT (deep + 10 key-value prompts) for each prompt
length of `--swin_prompts`, prompts + head trained. FLOPs come from compiling with abstract shapes
(nothing allocated, load-independent); img/s from `--steps` timed steps (0: compile only). The
extra tokens' share of the work is P / ws^2 (the prompts every window attends with, over its ws^2
patch tokens); the target is a prompted forward whose FLOP overhead stays close to that share.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def measure(arch: Architecture, protocol: str, prompt_kw, batch: int, n_steps: int,
            fast: bool) -> dict:
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
  fwd_flops = fwd.cost_analysis()["flops"]
  step_flops = step.cost_analysis()["flops"]
  mem = step.memory_analysis()

  state, m = step(state, frozen, batch_d)  # warm-up
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(n_steps):
    state, m = step(state, frozen, batch_d)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / n_steps
  return {
      "trainable_params": rules.count(trainable),
      "fwd_gflops": round(fwd_flops / 1e9, 3),
      "step_gflops": round(step_flops / 1e9, 3),
      "step_over_fwd": round(step_flops / fwd_flops, 4),
      "temp_mib": round(mem.temp_size_in_bytes / 2 ** 20, 1),
      "args_mib": round(mem.argument_size_in_bytes / 2 ** 20, 1),
      "step_s": round(dt, 4),
      "images_per_s": round(batch / dt, 2),
      "achieved_gflops_per_s": round(step_flops / dt / 1e9, 1),
  }


# ------------------------------------------------------------------------------------------------
# Swin (issue 16): what VPT prompts cost on a Swin Transformer.

SWIN_MODELS = {
    # Swin-B at 224 (VPT Table 2's backbone), a 100-class head instead of the 21k one.
    "swin-b": dict(image_size=(224, 224), patch_size=4, embed_dim=128, depths=(2, 2, 18, 2),
                   num_heads=(4, 8, 16, 32), window_size=7, num_classes=100),
    # The fixture-sized Swin of tests/data/swin (48 px, embed 8, window 3).
    "swin-tiny": dict(image_size=(48, 48), patch_size=2, embed_dim=8, depths=(2, 2, 2, 2),
                      num_heads=(2, 2, 4, 8), window_size=3, num_classes=10),
}


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def swin_measure(model, trainable: str, batch: int, n_steps: int) -> dict:
  """Forward and train-step (Adam) FLOPs of a Swin from abstract shapes; img/s when n_steps.

  trainable: 'full' (every parameter) or 'head' (the head and any prompts; backbone frozen).
  """
  import optax  # pylint: disable=g-import-not-at-top
  opt = optax.adam(1e-3)

  def split(v):
    if trainable == "full":
      return {"params": v["params"]}, {"params": {}}
    t = {"params": {"head": v["params"]["head"]}, **({"prompts": v["prompts"]}
                                                     if "prompts" in v else {})}
    return t, {"params": {k: x for k, x in v["params"].items() if k != "head"}}

  def forward(t, f, x):
    v = {**f, **{k: x_ for k, x_ in t.items() if k != "params"},
         "params": {**f["params"], **t["params"]}}
    return model.apply(v, x)

  def step(t, s, f, x, y):
    loss = lambda t: optax.softmax_cross_entropy_with_integer_labels(forward(t, f, x), y).mean()
    value, g = jax.value_and_grad(loss)(t)
    u, s = opt.update(g, s, t)
    return optax.apply_updates(t, u), s, value

  shape = (batch, *model.image_size, model.in_channels)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape[1:]))
  t_abs, f_abs = split(jax.eval_shape(init))
  x_abs = jax.ShapeDtypeStruct(shape, jnp.float32)
  y_abs = jax.ShapeDtypeStruct((batch,), jnp.int32)
  begin = time.perf_counter()
  fwd = jax.jit(forward).lower(t_abs, f_abs, x_abs).compile()
  stp = jax.jit(step, donate_argnums=(0, 1)).lower(
      t_abs, jax.eval_shape(opt.init, t_abs), f_abs, x_abs, y_abs).compile()
  out = {"trainable_params": rules.count(t_abs), "fwd_gflops": round(_flops(fwd) / 1e9, 3),
         "step_gflops": round(_flops(stp) / 1e9, 3),
         "compile_s": round(time.perf_counter() - begin, 1)}
  if n_steps:
    t, f = split(jax.jit(init)())
    s = jax.jit(opt.init)(t)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
    t, s, loss = stp(t, s, f, x, y)  # warm-up
    loss.block_until_ready()
    begin = time.perf_counter()
    for _ in range(n_steps):
      t, s, loss = stp(t, s, f, x, y)
    loss.block_until_ready()
    out["images_per_s"] = round(batch * n_steps / (time.perf_counter() - begin), 2)
  return out


def swin_report(name: str, lengths, batch: int, n_steps: int) -> dict:
  """Plain Swin (linear, full) and VPT-shallow / VPT-deep / E2VPT for each prompt length."""
  from vpt_jax.models import swin  # pylint: disable=g-import-not-at-top
  from vpt_jax.prompts import swin as swin_prompts  # pylint: disable=g-import-not-at-top
  cfg = SWIN_MODELS[name]
  base = swin.SwinTransformer(**cfg)
  res = {"linear": swin_measure(base, "head", batch, n_steps),
         "full": swin_measure(base, "full", batch, n_steps)}
  plain = res["linear"]
  for p in lengths:
    for arm, kw in (("vpt_shallow", dict(deep=False)), ("vpt_deep", dict(deep=True)),
                    ("e2vpt_kv10", dict(deep=True, kv_length=10))):
      r = swin_measure(swin_prompts.attach(base, length=p, **kw), "head", batch, n_steps)
      r["fwd_over_plain_fwd"] = round(r["fwd_gflops"] / plain["fwd_gflops"], 4)
      r["step_over_linear_step"] = round(r["step_gflops"] / plain["step_gflops"], 4)
      r["step_over_full_step"] = round(r["step_gflops"] / res["full"]["step_gflops"], 4)
      r["extra_token_share"] = round(p / cfg["window_size"] ** 2, 4)
      if n_steps:
        r["images_per_s_over_linear"] = round(r["images_per_s"] / plain["images_per_s"], 3)
      res[f"{arm}_p{p}"] = r
  return res


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="tiny,vit-b16")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--paths", default="fast,straightforward")
  ap.add_argument("--protocols", default=",".join(PROTOCOLS))
  ap.add_argument("--swin_prompts", default="10,50", help="Swin prompt lengths P")
  args = ap.parse_args()
  matmul = matmul_flops_per_s()
  out = {"benchmark": "step_cost", "device": str(jax.devices()[0].device_kind),
         "backend": jax.default_backend(), "host": platform.node(), "batch": args.batch,
         "matmul_gflops_per_s": round(matmul / 1e9, 1), "models": {}}
  for name in args.models.split(","):
    if name in SWIN_MODELS:
      out["models"][name] = swin_report(
          name, [int(p) for p in args.swin_prompts.split(",")], args.batch, args.steps)
      continue
    res = {}
    for path in args.paths.split(","):
      for p in args.protocols.split(","):
        proto, kw = PROTOCOLS[p]
        r = measure(MODELS[name], proto, kw, args.batch, args.steps, PATHS[path])
        r["achieved_over_matmul"] = round(r["achieved_gflops_per_s"] * 1e9 / matmul, 3)
        res[f"{p}/{path}"] = r
    for path in args.paths.split(","):
      if f"vpt_deep_p50/{path}" in res and f"linear/{path}" in res:
        res[f"deep_fwd_over_plain_fwd/{path}"] = round(
            res[f"vpt_deep_p50/{path}"]["fwd_gflops"] / res[f"linear/{path}"]["fwd_gflops"], 4)
    if {"vpt_deep_p50/fast", "vpt_deep_p50/straightforward", "linear/straightforward"} <= set(res):
      deep_f, deep_s = res["vpt_deep_p50/fast"], res["vpt_deep_p50/straightforward"]
      res["deep_fast_fwd_over_plain_straightforward_fwd"] = round(
          deep_f["fwd_gflops"] / res["linear/straightforward"]["fwd_gflops"], 4)
      res["deep_fast_over_straightforward_images_per_s"] = round(
          deep_f["images_per_s"] / deep_s["images_per_s"], 3)
    out["models"][name] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
