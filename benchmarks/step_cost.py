"""What a train step costs, per protocol: XLA FLOPs, compiled memory, measured images/s.

    python benchmarks/step_cost.py                 # tiny model and ViT-B/16 at 224, batch 8, 64
    python benchmarks/step_cost.py --models=tiny   # seconds, for a quick look
    python benchmarks/step_cost.py --models=vit-b16 --batch=64 --paths=fast \
        --protocols=vpt_deep_p50,linear --steps=1 --rounds=2   # the issue-19 batch-64 figure

Prints one JSON line. For each model, protocol (VPT-shallow p=50, VPT-deep p=50, full
fine-tuning, linear probe = the plain ViT's forward) and execution path (`fast`: compute only
what the output needs; `straightforward`: every row of every layer) and `--microbatch` setting
(0: the whole batch at once; auto: the trainer's default, chunks of the batch one after the other
on a CPU, `microbatch_size` in the README): forward and train-step FLOPs from XLA's cost analysis
(the step includes the gradient-norm logging the trainer does), their ratio, the compiled step's
memory, images/s over timed steps, and the FLOP/s achieved, as a fraction of the machine's
large-matmul FLOP/s measured in the same run, round by round (matmul, every step, matmul, every
step, ...; medians), because a shared machine's speed changes during a run. A step whose compiled
temp memory exceeds 80% of the free memory is reported but not run. Targets (issue 3): VPT step <= 2.05x its forward
FLOPs. Targets (issue 19): VPT-deep fast step >= 0.85x the matmul rate at batch 8 and 64; the plain
ViT (linear probe) >= 0.9x.
Targets (issue 9): VPT-deep fast forward <= 1.05x the plain ViT's forward FLOPs; VPT-deep fast
train step >= 1.3x the images/s of the straightforward path.
Weights are random (the cost does not depend on them), so no checkpoint is downloaded.

    python benchmarks/step_cost.py --memory=remat,compile,capacity   # issue 18, compile-only

prints, instead, one JSON line per section, from compiled steps of shapes alone (no weights are
allocated, so the figures do not depend on the machine's load): `remat` the VPT-deep p=50 train
step's XLA temp memory and FLOPs for ViT-B/16 and ViT-L/16 at batch 32 with model.remat none /
block / dots (target: <= 0.5x the memory at <= 1.4x the FLOPs); `compile` the seconds to compile
the ViT-H/14 step; `capacity` the per-device memory of the step on an 8-device host at batch 64
(8 per device) for ViT-B ... ViT-e, replicated float32 vs bf16 + frozen weights stored in bf16 and
sharded over the devices + remat (README, "Big backbones"); `sharded` (with --memory=sharded
alone: it starts 8 host devices) the ViT-B/16 step compiled over 8 devices with the frozen
weights replicated vs sharded, per-device arguments and temp memory.

Swin (issue 16), `--models=swin-tiny,swin-b`: the plain Swin (linear probe = head only; full
fine-tuning) next to VPT-shallow, VPT-deep and E2VPT (deep + 10 key-value prompts) for each prompt
length of `--swin_prompts`, prompts + head trained. FLOPs come from compiling with abstract shapes
(nothing allocated, load-independent); img/s from `--steps` timed steps (0: compile only). The
extra tokens' share of the work is P / ws^2 (the prompts every window attends with, over its ws^2
patch tokens); the target is a prompted forward whose FLOP overhead stays close to that share.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vpt_jax import prompts
from vpt_jax.tuning import build as build_lib
from vpt_jax.tuning import memory, optim, rules, steps
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
# Larger ViTs for the memory sections (shapes from the ViT / big_vision papers' tables).
BIG = {
    "tiny": MODELS["tiny"], "vit-b16": MODELS["vit-b16"],
    **{name: dataclasses.replace(MODELS["vit-b16"], patch_size=(p, p), grid=(224 // p,) * 2,
                                 width=w, depth=d, num_heads=h, mlp_dim=m)
       for name, p, w, d, h, m in (("vit-l16", 16, 1024, 24, 16, 4096),
                                   ("vit-h14", 14, 1280, 32, 16, 5120),
                                   ("vit-g14", 14, 1408, 40, 16, 6144),
                                   ("vit-G14", 14, 1664, 48, 16, 8192),
                                   ("vit-e14", 14, 1792, 56, 16, 15360))},
}


def matmul_flops_per_s(n: int = 4096, reps: int = 5) -> float:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    f(a, a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def build(arch: Architecture, protocol: str, prompt_kw, batch: int, fast: bool,
          microbatch: int = 0) -> dict:
  """The compiled forward and train step of one protocol and path, with their arguments.

  `microbatch` > 0: the train step runs the batch in chunks of that many rows (the trainer's
  `microbatch_size`); the forward compiled for FLOP counting is the plain one either way.
  """
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
  step = jax.jit(steps.make_train_step(model, tx, schedule, microbatch=microbatch),
                 donate_argnums=(0,)).lower(state, frozen, batch_d).compile()
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


# ------------------------------------------------------------------------------------------------
# Issue 18: memory, from compiled steps of abstract shapes.


def nbytes(tree) -> int:
  return int(sum(np.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def abstract_parts(arch: Architecture, *, remat: str = "none", dtype: str = "float32",
                   frozen_dtype: str = "float32", depth: int = 0):
  """(VPT-deep p=50 model, frozen tree, train state, optimizer, schedule), shapes only."""
  model = arch.model(fast_path=True, remat=remat, dtype=jnp.dtype(dtype), depth=depth or arch.depth)
  cfg = prompts.default_config()
  cfg.update(dict(length=50, deep=True))
  model = prompts.attach(model, cfg)
  image = jax.ShapeDtypeStruct((1, *arch.image_size, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
  trainable, frozen = rules.split(variables, rules.label(variables, rules.protocol_patterns("vpt")))
  frozen = memory.store_frozen(frozen, frozen_dtype)
  tx, schedule = optim.make_optimizer(optim.default_optim_config(), steps_per_epoch=100)
  state = jax.eval_shape(lambda t: steps.create_train_state(t, tx, jax.random.PRNGKey(1)),
                         trainable)
  return model, frozen, state, tx, schedule


# XLA:CPU's default scheduler orders for concurrency and runs the backward pass's recomputations
# early, which keeps most of what remat meant to free; the memory-minimising scheduler (TPU and
# GPU compilers schedule for memory by default) runs them where they are needed. --memory sections
# use it unless --cpu-default-scheduler (XLA_FLAGS, set before the backend starts).
CPU_MEMORY_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def abstract_step(arch: Architecture, batch: int, **kw):
  """(compiled VPT-deep p=50 train step, its compile seconds) from shapes alone."""
  model, frozen, state, tx, schedule = abstract_parts(arch, **kw)
  batch_d = {"image": jax.ShapeDtypeStruct((batch, *arch.image_size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
  t = time.perf_counter()
  compiled = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=(0,)).lower(
      state, frozen, batch_d).compile()
  return compiled, time.perf_counter() - t


def remat_section(models, batch: int) -> dict:
  out = {}
  for name in models:
    res = {}
    for remat in ("none", "block", "dots"):
      compiled, secs = abstract_step(BIG[name], batch, remat=remat)
      res[remat] = {"temp_mib": round(compiled.memory_analysis().temp_size_in_bytes / 2 ** 20, 1),
                    "step_gflops": round(compiled.cost_analysis()["flops"] / 1e9, 2),
                    "compile_s": round(secs, 1)}
    for remat in ("block", "dots"):
      res[f"{remat}_over_none"] = {
          "temp": round(res[remat]["temp_mib"] / res["none"]["temp_mib"], 3),
          "flops": round(res[remat]["step_gflops"] / res["none"]["step_gflops"], 3)}
    out[name] = res
  return {"section": "remat", "batch": batch, "protocol": "vpt_deep_p50/fast", "models": out,
          "targets": {"temp": "<= 0.5", "flops": "<= 1.4"}}


def compile_section(name: str, batch: int) -> dict:
  out = {}
  for remat in ("none", "block"):
    _, secs = abstract_step(BIG[name], batch, remat=remat)
    out[f"remat_{remat}_compile_s"] = round(secs, 1)
  return {"section": "compile", "model": name, "batch": batch, "depth": BIG[name].depth, **out}


def sharded_section(name: str, devices: int, global_batch: int) -> dict:
  """The step compiled over `devices` devices (XLA_FLAGS host devices on CPU) with the frozen
  weights replicated vs sharded (model.frozen_sharding): per-device arguments and temp memory."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  model, frozen, state, tx, schedule = abstract_parts(BIG[name], remat="block")
  arch = BIG[name]
  batch_d = {"image": jax.ShapeDtypeStruct((global_batch, *arch.image_size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32)}
  out, held_bytes = {}, {}
  for kind in memory.FROZEN_SHARDINGS:
    fs = memory.frozen_shardings(frozen, mesh, kind)
    held = sum(np.prod(s.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(frozen), jax.tree.leaves(fs)))
    step = memory.gathered(steps.make_train_step(model, tx, schedule), fs, replicated)
    compiled = jax.jit(step, donate_argnums=(0,), in_shardings=(replicated, fs, batch_s),
                       out_shardings=(replicated, replicated)).lower(state, frozen,
                                                                     batch_d).compile()
    ma = compiled.memory_analysis()
    held_bytes[kind] = held
    out[kind] = {"frozen_per_device_mib": round(held / 2 ** 20, 1),
                 "arguments_per_device_mib": round(ma.argument_size_in_bytes / 2 ** 20, 1),
                 "temp_per_device_mib": round(ma.temp_size_in_bytes / 2 ** 20, 1)}
  out["frozen_sharded_over_replicated"] = round(held_bytes["sharded"] / held_bytes["replicated"],
                                                4)
  return {"section": "sharded", "model": name, "devices": devices, "global_batch": global_batch,
          "remat": "block", **out}


SETUPS = {  # (compute dtype, frozen storage, frozen sharded, remat)
    "float32_replicated": ("float32", "float32", False, "none"),
    "float32_sharded_remat": ("float32", "float32", True, "block"),
    # XLA:CPU has no bf16 matmul: it converts the operands to float32, so these temp figures hold
    # float32 copies of the kernels that a TPU never makes (an upper bound there).
    "bf16_sharded_remat": ("bfloat16", "bfloat16", True, "block"),
}


def capacity_section(models, devices: int, global_batch: int, device_gib: float,
                     check: str, setups=tuple(SETUPS)) -> dict:
  """Per-device bytes of the step on `devices` devices at `global_batch`: XLA's temp memory of one
  device's step (batch global / devices), fitted a + b * depth from the compiled depth-2 and
  depth-4 steps (checked against the full-depth compile of `check`), plus the arguments that
  device holds: the train state (replicated), the frozen backbone (all of it, or 1/devices when
  sharded) and, when sharded, two layers' gathered weights (the one in use and the next)."""
  per = global_batch // devices
  out, fits = {}, {}
  for setup in setups:
    dtype, fdtype, sharded, remat = SETUPS[setup]
    for name in models:
      arch = BIG[name]
      temps = {d: abstract_step(arch, per, remat=remat, dtype=dtype, frozen_dtype=fdtype,
                                depth=d)[0].memory_analysis().temp_size_in_bytes for d in (2, 4)}
      temp = temps[2] + (temps[4] - temps[2]) / 2 * (arch.depth - 2)
      _, frozen, state, _, _ = abstract_parts(arch, remat=remat, dtype=dtype, frozen_dtype=fdtype)
      layer = nbytes(frozen["params"]["Transformer"]["encoderblock_0"])
      fb = nbytes(frozen)
      held = fb / devices + 2 * layer if sharded else fb
      total = temp + nbytes(state) + held
      r = {"temp_gib": round(temp / 2 ** 30, 2), "frozen_gib": round(fb / 2 ** 30, 2),
           "frozen_held_gib": round(held / 2 ** 30, 2),
           "state_mib": round(nbytes(state) / 2 ** 20, 1),
           "per_device_gib": round(total / 2 ** 30, 2), "fits": total <= device_gib * 2 ** 30}
      if name == check:
        compiled, _ = abstract_step(arch, per, remat=remat, dtype=dtype, frozen_dtype=fdtype)
        full = compiled.memory_analysis().temp_size_in_bytes
        r["temp_full_compile_gib"] = round(full / 2 ** 30, 2)
        r["fit_error"] = round(temp / full - 1, 3)
      out[f"{setup}/{name}"] = r
    fits[setup] = [n for n in models if out[f"{setup}/{n}"]["fits"]]
  return {"section": "capacity", "devices": devices, "global_batch": global_batch,
          "device_gib": device_gib, "protocol": "vpt_deep_p50/fast", "models": out,
          "largest_that_fits": {k: (v[-1] if v else None) for k, v in fits.items()}}
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


def time_steps(built: dict, n_steps: int) -> float:
  """Seconds per train step over `n_steps` steps (the state carried on, as the trainer does)."""
  state, frozen, batch_d = built["step_args"]
  t = time.perf_counter()
  for _ in range(n_steps):
    state, m = built["step"](state, frozen, batch_d)
  jax.block_until_ready(m)
  built["step_args"] = (state, frozen, batch_d)
  return (time.perf_counter() - t) / n_steps


def auto_microbatch(arch: Architecture, prompt_kw) -> int:
  """The trainer's automatic chunk rows (`microbatch_size=0`) for this model on this backend."""
  cfg = ml_collections.ConfigDict({"prompt": prompts.default_config()})
  cfg.prompt.length = (prompt_kw or {}).get("length", 0)
  per_row = build_lib.activation_bytes_per_row(cfg, arch.model(fast_path=True))
  return steps.auto_microbatch(0, per_row, jax.default_backend())


def _key(p: str, path: str, mb: int) -> str:
  return f"{p}/{path}" + (f"/microbatch{mb}" if mb else "")


def measure(arch: Architecture, keys, batch: int, n_steps: int, rounds: int) -> dict:
  """Every (protocol, path, microbatch) of `keys` at one batch size, in interleaved rounds.

  A round times the large matmul and then each step; a step's `achieved_over_matmul` is the
  median over rounds of its FLOP/s over the same round's matmul FLOP/s, so a machine whose load
  changes during the run (other processes) compares each step with the rate it had meanwhile.
  A chunked step's FLOPs are taken from the unchunked step of the same protocol and path (the
  same arithmetic; XLA's cost analysis counts a loop body once).
  """
  built, res = {}, {}
  free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
  for p, path, setting in keys:
    proto, kw = PROTOCOLS[p]
    mb = setting if setting != "auto" else auto_microbatch(arch, kw)
    if mb and batch <= mb:
      continue
    k = _key(p, path, mb)
    if k in built:
      continue
    built[k] = build(arch, proto, kw, batch, PATHS[path], mb)
    res[k] = static_cost(built[k])
    if setting == "auto":
      res[k]["microbatch_auto"] = True
    if res[k]["temp_mib"] * 2 ** 20 > 0.8 * free:  # would swap or be killed: not timed
      res[k]["skipped"] = f"needs {res[k]['temp_mib']:.0f} MiB, {free / 2**20:.0f} MiB free"
      del built[k]
      continue
    if mb:
      res[k].update({kk: res[_key(p, path, 0)][kk] for kk in ("fwd_gflops", "step_gflops")
                     if _key(p, path, 0) in res})
      res[k]["microbatch"] = mb
    time_steps(built[k], 1)  # warm-up
  times = {k: [] for k in built}
  ratios = {k: [] for k in built}
  rates = []
  for _ in range(rounds):
    rate = matmul_flops_per_s(reps=2)
    rates.append(rate)
    for k, b in built.items():
      dt = time_steps(b, n_steps)
      times[k].append(dt)
      ratios[k].append(res[k]["step_gflops"] * 1e9 / dt / rate)
  for k in built:
    dt = statistics.median(times[k])
    r = res[k]
    r.update({"step_s": round(dt, 4), "images_per_s": round(batch / dt, 2),
              "achieved_gflops_per_s": round(r["step_gflops"] / dt, 1),
              "achieved_over_matmul": round(statistics.median(ratios[k]), 3),
              "achieved_over_matmul_rounds": [round(x, 3) for x in ratios[k]]})
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
  ap.add_argument("--microbatch", default="0,auto",
                  help="train steps' microbatch_size values (0: the whole batch at once; auto: "
                       "the trainer's automatic chunks, on a CPU only)")
  ap.add_argument("--protocols", default=",".join(PROTOCOLS))
  ap.add_argument("--memory", default="", help="issue 18 sections instead: remat,compile,capacity")
  ap.add_argument("--memory-batch", type=int, default=32)
  ap.add_argument("--remat-models", default="vit-b16,vit-l16")
  ap.add_argument("--compile-model", default="vit-h14")
  ap.add_argument("--capacity-models", default=",".join(list(BIG)[1:]))
  ap.add_argument("--capacity-devices", type=int, default=8)
  ap.add_argument("--capacity-batch", type=int, default=64)
  ap.add_argument("--device-gib", type=float, default=16.0)
  ap.add_argument("--capacity-setups", default=",".join(SETUPS))
  ap.add_argument("--sharded-model", default="vit-b16")
  ap.add_argument("--capacity-check", default="vit-b16",
                  help="also compile this model at full depth to check the depth fit")
  ap.add_argument("--cpu-default-scheduler", action="store_true",
                  help="--memory: keep XLA:CPU's concurrency-optimised scheduler")
  ap.add_argument("--swin_prompts", default="10,50", help="Swin prompt lengths P")
  args = ap.parse_args()
  if args.memory:
    flags = [] if args.cpu_default_scheduler else [CPU_MEMORY_SCHEDULER]
    if "sharded" in args.memory:  # host devices for the sharded section (CPU only)
      flags.append(f"--xla_force_host_platform_device_count={args.capacity_devices}")
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + flags)
    base = {"benchmark": "step_cost_memory", "backend": jax.default_backend(),
            "host": platform.node(),
            "cpu_scheduler": "default" if args.cpu_default_scheduler else "memory"}
    for section in args.memory.split(","):
      if section == "remat":
        res = remat_section(args.remat_models.split(","), args.memory_batch)
      elif section == "compile":
        res = compile_section(args.compile_model, args.memory_batch)
      elif section == "sharded":
        res = sharded_section(args.sharded_model, args.capacity_devices, args.capacity_batch)
      elif section == "capacity":
        res = capacity_section(args.capacity_models.split(","), args.capacity_devices,
                               args.capacity_batch, args.device_gib, args.capacity_check,
                               args.capacity_setups.split(","))
      else:
        raise SystemExit(f"--memory: unknown section {section!r} "
                         "(remat, compile, capacity, sharded)")
      print(json.dumps(base | res), flush=True)
    return
  out = {"benchmark": "step_cost", "device": str(jax.devices()[0].device_kind),
         "backend": jax.default_backend(), "host": platform.node(), "models": {}}
  paths = args.paths.split(",")
  keys = [(p, path, mb if mb == "auto" else int(mb)) for mb in args.microbatch.split(",")
          for path in paths for p in args.protocols.split(",")]
  for name in args.models.split(","):
    if name in SWIN_MODELS:
      out["models"][name] = swin_report(name, [int(p) for p in args.swin_prompts.split(",")],
                                        int(args.batch.split(",")[0]), args.steps)
      continue
    out["models"][name] = {}
    for batch in (int(b) for b in args.batch.split(",")):
      res = measure(MODELS[name], keys, batch, args.steps, args.rounds)
      ratios(res, paths)
      out["models"][name][f"batch_{batch}"] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
