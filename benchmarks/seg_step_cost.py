"""What a SETR-PUP segmentation train step costs: XLA FLOPs and compiled memory, per protocol.

    python benchmarks/seg_step_cost.py                     # ViT-L/16 at 512 (compile only) + tiny
    python benchmarks/seg_step_cost.py --models=tiny       # seconds

Prints one JSON line. For each model and protocol (Table 3 of the VPT paper: head-only, bias,
VPT-deep with p prompts, VPT+bias, full) the train step (forward with the decode and auxiliary
heads, loss, gradients of the trainable leaves, SGD update) is lowered with abstract shapes
(`jax.eval_shape` for every variable, so no ViT-L weights are ever allocated) and compiled; XLA's
cost analysis gives its FLOPs and the compiled executable its temporary memory. The inference
forward (decode head only) is costed the same way. Parameter counts follow the paper: trainable
backbone leaves + all heads (decode and auxiliary). Images/s are measured (--time_steps real
steps on random weights) for the tiny model only: ViT-L steps are not run on a shared CPU.
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
from vpt_jax.models.vit import VisionTransformer
from vpt_jax.tasks import segmentation as seg
from vpt_jax.tuning import optim, rules, seg_steps

MODELS = {
    # ViT-L/16 as SETR's backbone: 24 layers, width 1024, 16 heads, MLP 4096, 512x512 input.
    "vit-l16": dict(image_size=(512, 512), patch_size=(16, 16), width=1024, depth=24,
                    num_heads=16, mlp_dim=4096, posemb_cls_row=True),
    "tiny": dict(image_size=(32, 32), patch_size=(4, 4), width=64, depth=2, num_heads=4,
                 mlp_dim=128, posemb_cls_row=True),
}


def sig(x: float) -> float:
  return float(f"{x:.5g}")


def specs(name: str, depth: int):
  if name == "tiny":  # 4x upsampling for patch 4
    return (seg.HeadSpec(layer=1, channels=32, num_convs=2, up_scale=2),
            (seg.HeadSpec(layer=0, channels=32, num_convs=1, up_scale=4, weight=0.4),))
  return seg.setr_pup_specs(depth)


def build(name: str, protocol: str, length: int, num_classes: int):
  backbone = VisionTransformer(num_classes=None, **MODELS[name])
  if protocol.startswith("vpt"):
    cfg = prompts.default_config()
    cfg.update(dict(length=length, deep=True))
    backbone = prompts.attach(backbone, cfg)
  dec, aux = specs(name, backbone.depth)
  sm = seg.Segmenter(backbone, seg.SETRPUP(num_classes=num_classes, decode=dec, aux=aux))
  h, w = backbone.image_size
  x = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  bb = jax.eval_shape(lambda r, im: backbone.init(r, im), jax.random.PRNGKey(0), x)
  hv = jax.eval_shape(sm.init_head, jax.random.PRNGKey(0))
  return sm, dict(bb), hv


def cost(name: str, protocol: str, length: int, batch: int, num_classes: int,
         steps: int) -> dict:
  sm, bb, hv = build(name, protocol, length, num_classes)
  pattern = "vpt" if protocol == "vpt" else protocol
  t_b, frozen = rules.split(bb, rules.label(bb, seg_steps.backbone_patterns(pattern)))
  tx = optim.sgd_poly()
  trainable = {"backbone": t_b, "head": hv["params"]}
  state = jax.eval_shape(lambda t, s: seg_steps.create_train_state(t, s, tx, jax.random.PRNGKey(0)),
                         trainable, hv["batch_stats"])
  h, w = sm.backbone.image_size
  data = {"image": jax.ShapeDtypeStruct((batch, h, w, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((batch, h, w), jnp.int32)}
  t0 = time.perf_counter()
  step = jax.jit(seg_steps.make_train_step(sm, tx), donate_argnums=(0,)).lower(
      state, frozen, data).compile()
  compile_s = time.perf_counter() - t0
  fwd = jax.jit(lambda b, hv_, x: sm.apply(b, hv_, x)[0]).lower(
      bb, hv, data["image"]).compile()
  ca, fa = step.cost_analysis(), fwd.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  fa = fa[0] if isinstance(fa, (list, tuple)) else fa
  mem = step.memory_analysis()
  heads = rules.count(hv["params"])
  out = {
      "trainable_params_M": round((rules.count(t_b) + heads) / 1e6, 3),
      "head_params_M": round(heads / 1e6, 3),
      "backbone_trainable": rules.count(t_b),
      "step_gflops": sig(ca["flops"] / 1e9),
      "step_gflops_per_image": sig(ca["flops"] / 1e9 / batch),
      "inference_gflops_per_image": sig(fa["flops"] / 1e9 / batch),
      "step_temp_gib": round(mem.temp_size_in_bytes / 2 ** 30, 2),
      "step_args_gib": round(mem.argument_size_in_bytes / 2 ** 30, 2),
      "compile_s": round(compile_s, 1),
  }
  if steps:
    rng = np.random.default_rng(0)
    real = lambda s: jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(0, 0.02, a.shape), a.dtype), s)
    st = real(state)
    st = st.replace(step=jnp.zeros((), jnp.int32), rng=jax.random.PRNGKey(0),
                    opt_state=tx.init(st.trainable))
    fz = real(frozen)
    d = {"image": jnp.asarray(rng.uniform(-1, 1, (batch, h, w, 3)), jnp.float32),
         "label": jnp.asarray(rng.integers(0, num_classes, (batch, h, w)), jnp.int32)}
    st, m = step(st, fz, d)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
      st, m = step(st, fz, d)
    jax.block_until_ready(m)
    out["images_per_s"] = round(batch * steps / (time.perf_counter() - t), 1)
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--models", default="vit-l16,tiny")
  ap.add_argument("--protocols", default="head,vpt", help="head, bias, vpt, vpt+bias, full")
  ap.add_argument("--prompts", type=int, default=50, help="VPT-deep prompt length")
  ap.add_argument("--batch", type=int, default=2, help="per device (mmseg: 8 GPUs x 2)")
  ap.add_argument("--classes", type=int, default=150)
  ap.add_argument("--time_steps", type=int, default=5, help="timed steps for the tiny model")
  args = ap.parse_args()
  out = {"benchmark": "seg_step_cost", "backend": jax.default_backend(),
         "device": str(jax.devices()[0].device_kind), "host": platform.node(),
         "batch": args.batch, "prompts": args.prompts, "models": {}}
  for name in args.models.split(","):
    res = {}
    for p in args.protocols.split(","):
      res[p] = cost(name, p, args.prompts, args.batch, args.classes,
                    args.time_steps if name == "tiny" else 0)
    if "head" in res and "vpt" in res:
      res["vpt_over_head_step_flops"] = round(res["vpt"]["step_gflops"] /
                                              res["head"]["step_gflops"], 4)
      res["vpt_over_plain_inference_flops"] = round(
          res["vpt"]["inference_gflops_per_image"] / res["head"]["inference_gflops_per_image"], 4)
    out["models"][name] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
