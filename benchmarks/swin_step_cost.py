"""What VPT prompts cost on a Swin Transformer: XLA FLOPs of Swin-B at 224, img/s of a tiny Swin.

    python benchmarks/swin_step_cost.py          # Swin-B FLOPs (compile only) + tiny img/s
    python benchmarks/swin_step_cost.py --prompts=5 --models=swin-b

Prints one JSON line. Swin-B (embed 128, depths 2-2-18-2, heads 4-8-16-32, window 7, 224 px,
21k-class head dropped for a 100-class one) is only lowered and compiled with abstract shapes
(`jax.jit(f).lower(shapes).compile().cost_analysis()`): nothing runs, so no weights are needed.
For each prompt length P: the forward and the train step of VPT-deep (prompts + head trained,
backbone frozen) and of E2VPT (deep prompts + 10 key/value prompts) next to the plain Swin's
forward, linear-probe step (head only) and full fine-tuning step.

The extra tokens' share of the work is P / ws^2 (the prompts every window attends with, over the
49 window tokens); the target (issue 16) is a prompted forward whose FLOP overhead over the plain
forward stays close to that share. Images/s are measured on the tiny fixture-sized Swin only
(48 px, embed 8), on whatever device JAX picks.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vpt_jax.models import swin
from vpt_jax.prompts import swin as swin_prompts
from vpt_jax.weights import torch_swin

SWIN_B = dict(image_size=(224, 224), patch_size=4, embed_dim=128, depths=(2, 2, 18, 2),
              num_heads=(4, 8, 16, 32), window_size=7, num_classes=100)
TINY = dict(image_size=(48, 48), patch_size=2, embed_dim=8, depths=(2, 2, 2, 2),
            num_heads=(2, 2, 4, 8), window_size=3, num_classes=10)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"])


def _variants(base: swin.SwinTransformer, p: int) -> dict:
  return {"vpt_deep": swin_prompts.attach(base, length=p, deep=True),
          "e2vpt": swin_prompts.attach(base, length=p, deep=True, kv_length=10)}


def _functions(model: swin.SwinTransformer
               ) -> Tuple[Callable, Callable, optax.GradientTransformation]:
  """(forward, train step, optimizer) over variables split into trainable and frozen parts."""
  opt = optax.adam(1e-3)

  def merge(t, f):
    out = {**f, "params": {**f["params"], **t.get("params", {})}}
    if "prompts" in t:
      out["prompts"] = t["prompts"]
    return out

  def forward(t, f, images):
    return model.apply(merge(t, f), images)

  def step(t, s, f, images, labels):
    def loss(t):
      logits = forward(t, f, images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    value, g = jax.value_and_grad(loss)(t)
    u, s = opt.update(g, s, t)
    return optax.apply_updates(t, u), s, value

  return forward, step, opt


def _split(variables: dict, trainable: str) -> Tuple[dict, dict]:
  """(trainable, frozen): 'full' trains every parameter, otherwise the head and any prompts."""
  params = variables["params"]
  if trainable == "full":
    return {"params": params}, {"params": {}}
  t = {"params": {"head": params["head"]}}
  if "prompts" in variables:
    t["prompts"] = variables["prompts"]
  return t, {"params": {k: v for k, v in params.items() if k != "head"}}


def measure(model: swin.SwinTransformer, trainable: str, batch: int, *, run_steps: int = 0,
            rng: Optional[np.random.Generator] = None) -> dict:
  """FLOPs of forward and train step (abstract shapes); with run_steps, measured img/s too."""
  shape = (batch, *model.image_size, model.in_channels)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1,) + shape[1:])))
  t_abs, f_abs = _split(abstract, trainable)
  forward, step, opt = _functions(model)
  s_abs = jax.eval_shape(opt.init, t_abs)
  x_abs = jax.ShapeDtypeStruct(shape, jnp.float32)
  y_abs = jax.ShapeDtypeStruct((batch,), jnp.int32)
  t0 = time.perf_counter()
  fwd = jax.jit(forward).lower(t_abs, f_abs, x_abs).compile()
  stp = jax.jit(step, donate_argnums=(0, 1)).lower(t_abs, s_abs, f_abs, x_abs, y_abs).compile()
  out = {"forward_flops": _flops(fwd), "step_flops": _flops(stp),
         "compile_s": round(time.perf_counter() - t0, 1)}
  if run_steps:
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1,) + shape[1:]))
    t, f = _split(variables, trainable)
    s = jax.jit(opt.init)(t)
    images = jnp.asarray(rng.normal(size=shape), jnp.float32)
    labels = jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
    fwd(t, f, images).block_until_ready()
    begin = time.perf_counter()
    for _ in range(run_steps):
      y = fwd(t, f, images)
    y.block_until_ready()
    out["forward_img_s"] = round(batch * run_steps / (time.perf_counter() - begin), 1)
    t, s, loss = stp(t, s, f, images, labels)
    loss.block_until_ready()
    begin = time.perf_counter()
    for _ in range(run_steps):
      t, s, loss = stp(t, s, f, images, labels)
    loss.block_until_ready()
    out["step_img_s"] = round(batch * run_steps / (time.perf_counter() - begin), 1)
  return out


def report(cfg: dict, prompts: list[int], batch: int, *, run_steps: int = 0) -> dict:
  base = swin.SwinTransformer(**cfg)
  rng = np.random.default_rng(0)
  out = {"plain_linear": measure(base, "head", batch, run_steps=run_steps, rng=rng),
         "plain_full": measure(base, "full", batch, run_steps=run_steps, rng=rng)}
  plain_fwd = out["plain_linear"]["forward_flops"]
  ws2 = cfg["window_size"] ** 2
  for p in prompts:
    for name, model in _variants(base, p).items():
      m = measure(model, "prompts+head", batch, run_steps=run_steps, rng=rng)
      m["forward_overhead"] = round(m["forward_flops"] / plain_fwd - 1, 4)
      m["step_over_plain_full_step"] = round(m["step_flops"] / out["plain_full"]["step_flops"], 3)
      m["extra_token_share"] = round(p / ws2, 4)
      out[f"{name}_p{p}"] = m
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompts", default="10,50", help="prompt lengths P, comma-separated")
  parser.add_argument("--batch", type=int, default=8, help="batch size for the FLOP counts")
  parser.add_argument("--tiny_batch", type=int, default=32)
  parser.add_argument("--tiny_steps", type=int, default=10)
  parser.add_argument("--models", default="swin-b,tiny")
  args = parser.parse_args()
  prompts = [int(p) for p in args.prompts.split(",")]
  result = {"device": jax.devices()[0].device_kind, "platform": platform.machine(),
            "batch": args.batch}
  models = args.models.split(",")
  if "swin-b" in models:
    result["swin_b_224"] = report(SWIN_B, prompts, args.batch)
  if "tiny" in models:
    result["tiny_48"] = report(TINY, [3], args.tiny_batch, run_steps=args.tiny_steps)
    result["tiny_batch"] = args.tiny_batch
  print(json.dumps(result))


if __name__ == "__main__":
  main()
