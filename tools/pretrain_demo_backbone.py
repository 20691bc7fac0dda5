"""Pretrains the demo backbone shipped as vpt_jax/assets/demo_vit.npz (model-zoo name 'demo-vit').

    python tools/pretrain_demo_backbone.py [--out vpt_jax/assets/demo_vit.npz]

A small ViT (32px, patch 4, width 64, 4 layers, 4 heads, MLP 192, class token) is trained from
scratch, all parameters, on the procedural shapes task of `vpt_jax.data.shapes` (14 classes of
shapes and strokes; fresh images every epoch), then written in the original vit_jax .npz layout so
that the demo loads it through `vpt_jax.load_pretrained` like any published checkpoint. The
downstream demo task (handwritten digits) is never seen here. Everything is seeded: the same
command on the same software gives the same file (a rerun reproduced the shipped asset byte for
byte). 7 to 10 minutes on 2 CPU cores shared with other jobs (415 s and 616 s measured).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vpt_jax.data import shapes  # pylint: disable=g-import-not-at-top
from vpt_jax.models.vit import VisionTransformer  # pylint: disable=g-import-not-at-top
from vpt_jax.tuning import optim, rules, steps
from vpt_jax.weights import npz

ARCH = dict(image_size=(32, 32), patch_size=(4, 4), width=64, depth=4, num_heads=4, mlp_dim=192,
            num_classes=len(shapes.SHAPE_CLASSES), pool_type="token", class_token=True,
            posemb_cls_row=True)


def accuracy(apply, variables, images, labels, batch=500) -> float:
  correct = 0
  for i in range(0, len(labels), batch):
    x = images[i:i + batch].astype(np.float32) / 127.5 - 1.0
    correct += int((np.argmax(apply(variables, x), -1) == labels[i:i + batch]).sum())
  return correct / len(labels)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="vpt_jax/assets/demo_vit.npz")
  ap.add_argument("--epochs", type=int, default=6)
  ap.add_argument("--per_epoch", type=int, default=40_000)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--held_out", type=int, default=5000, help="held-out images for accuracy")
  args = ap.parse_args()
  t0 = time.time()

  model = VisionTransformer(**ARCH)
  variables = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, 32, 32, 3)))
  mask = rules.label(variables, rules.protocol_patterns("full"))
  trainable, frozen = rules.split(variables, mask)
  ocfg = optim.default_optim_config()
  ocfg.update(dict(name="adamw", lr=1e-3, wd=0.05, warmup_epochs=1, epochs=args.epochs,
                    wd_exclude=(r".*/bias", r".*/scale", r"params/pos_embedding", r"params/cls")))
  spe = args.per_epoch // args.batch
  tx, schedule = optim.make_optimizer(ocfg, spe)
  state = steps.create_train_state(trainable, tx, jax.random.PRNGKey(args.seed + 1))
  step = jax.jit(steps.make_train_step(model, tx, schedule), donate_argnums=(0,))
  apply = jax.jit(model.apply)
  held_x, held_y = shapes.make_shapes(args.held_out, seed=10_000 + args.seed)

  for epoch in range(args.epochs):
    # Fresh images every epoch: the task is generated, so there is no need to repeat any.
    x, y = shapes.make_shapes(args.per_epoch, seed=args.seed * 1000 + epoch)
    order = np.random.default_rng([args.seed, epoch]).permutation(len(y))
    losses = []
    for b in range(spe):
      idx = order[b * args.batch:(b + 1) * args.batch]
      batch = {"image": x[idx].astype(np.float32) / 127.5 - 1.0, "label": y[idx]}
      state, metrics = step(state, frozen, batch)
      losses.append(metrics["loss"])
    params = rules.merge(state.trainable, frozen)
    held = accuracy(apply, params, held_x, held_y)
    print(f"epoch {epoch + 1}/{args.epochs}: loss {float(np.mean(jax.device_get(losses))):.4f}, "
          f"held-out accuracy {held:.4f}, {time.time() - t0:.0f}s", flush=True)

  params = rules.merge(state.trainable, frozen)["params"]
  npz.save_npz(jax.device_get(params), args.out, layout="vit_jax")
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.2f} MiB); held-out accuracy "
        f"{accuracy(apply, {'params': params}, held_x, held_y):.4f}; {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
