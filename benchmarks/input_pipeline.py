"""Is the input pipeline fast enough? Images/s of the pipeline next to the train step's.

    python benchmarks/input_pipeline.py            # 1000 JPEGs, VTAB and FGVC preprocessing
    python benchmarks/input_pipeline.py --images 200 --models=tiny

Prints one JSON line. The data are 1000 synthetic JPEGs of 500x375 (a typical VTAB / FGVC source
size) held in memory as bytes, as the sources hold them. For the VTAB preprocessing (resize to 224,
no augmentation) the split is decoded once and cached, so the figure is the steady state after a
one-off cache build (also reported); for FGVC (resize 256, random crop 224, flip) every epoch
decodes and augments. The train step is VPT-deep (p = 50) on ViT-B/16 at 224 (and, with
--models, the demo-sized tiny ViT at 32). Goal (issue 5): pipeline >= 3x the step's images/s.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vpt_jax import prompts
from vpt_jax.data import pipeline, sources
from vpt_jax.tuning import optim, rules, steps
from vpt_jax.weights.npz import Architecture

tf.config.set_visible_devices([], "GPU")


def synthetic_jpegs(n: int, seed: int = 0) -> sources.Split:
  rng = np.random.default_rng(seed)
  base = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
  images = []
  for i in range(n):
    img = np.roll(base, 7 * i, axis=1)  # different content, same cost per image
    images.append(tf.io.encode_jpeg(img, quality=90).numpy())
  return sources.Split(np.array(images, dtype=object), (np.arange(n) % 10).astype(np.int32))


def pipeline_rate(split, crop: str, size: int, batch: int, steps: int) -> dict:
  cfg = sources.default_config()
  cfg.crop = crop
  t = time.perf_counter()
  pipe = pipeline.Pipeline(split, pipeline.make_preprocess(cfg, size, train=True),
                           batch_size=batch, seed=0)
  build = time.perf_counter() - t
  it = pipe.train_batches(0)
  next(it)  # warm-up: the first tf.data batch sets up the graph
  t = time.perf_counter()
  for _ in range(steps):
    next(it)
  dt = time.perf_counter() - t
  return {"images_per_s": round(batch * steps / dt, 1), "setup_s": round(build, 2),
          "cached": pipe._cached is not None}  # pylint: disable=protected-access


def step_rate(arch: Architecture, batch: int, n_steps: int = 3) -> float:
  cfg = prompts.default_config()
  model = prompts.attach(arch.model(), cfg)
  x = jnp.zeros((batch, *arch.image_size, 3), jnp.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  trainable, frozen = rules.split(
      variables, rules.label(variables, rules.protocol_patterns("vpt")))
  tx, schedule = optim.make_optimizer(optim.default_optim_config(), 10)
  state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(1))
  step = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=(0,))
  batch_d = {"image": x, "label": jnp.zeros((batch,), jnp.int32)}
  state, m = step(state, frozen, batch_d)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(n_steps):
    state, m = step(state, frozen, batch_d)
  jax.block_until_ready(m)
  return batch * n_steps / (time.perf_counter() - t)


ARCHS = {
    "vit-b16": (Architecture(patch_size=(16, 16), in_channels=3, width=768, depth=12,
                             num_heads=12, mlp_dim=3072, grid=(14, 14), pool_type="token",
                             class_token=True, posemb_cls_row=True, representation_size=None,
                             num_classes=100), 224, 8),
    "tiny": (Architecture(patch_size=(4, 4), in_channels=3, width=64, depth=4, num_heads=4,
                          mlp_dim=192, grid=(8, 8), pool_type="token", class_token=True,
                          posemb_cls_row=True, representation_size=None, num_classes=10), 32, 64),
}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", type=int, default=1000)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--models", default="vit-b16")
  args = ap.parse_args()
  split = synthetic_jpegs(args.images)
  out = {"benchmark": "input_pipeline", "backend": jax.default_backend(),
         "images": args.images, "batch": args.batch, "models": {}}
  for name in args.models.split(","):
    arch, size, step_batch = ARCHS[name]
    step = step_rate(arch, step_batch)
    res = {"train_step_images_per_s": round(step, 2)}
    for crop in ("resize", "resize_crop"):
      r = pipeline_rate(split, crop, size, args.batch, args.steps)
      r["over_step"] = round(r["images_per_s"] / step, 1)
      res["vtab" if crop == "resize" else "fgvc"] = r
    out["models"][name] = res
  print(json.dumps(out))


if __name__ == "__main__":
  main()
