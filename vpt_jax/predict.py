"""Print a checkpoint's top-k predictions for some images.

    python -m vpt_jax.predict --config=configs/demo.py [--config.images=a.jpg,b.png]
    python -m vpt_jax.predict --config=configs/demo.py --config.model.checkpoint=vit-b16-i21k

Without images it runs on a few generated test patterns, so it works offline on a fresh machine.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from ml_collections import config_flags

from vpt_jax import checkpoints

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (e.g. configs/demo.py).")


def load_backbone(cfg: ml_collections.ConfigDict):
  """`load_pretrained` called with a `configs.common.backbone()` section."""
  if cfg.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config model.dtype={cfg.dtype!r}: expected 'float32' or 'bfloat16'")
  return checkpoints.load_pretrained(
      cfg.checkpoint, image_size=cfg.image_size or None, num_classes=cfg.num_classes or None,
      drop_pre_logits=cfg.drop_pre_logits, dtype=jnp.dtype(cfg.dtype))


def test_patterns(size: Tuple[int, int]) -> Dict[str, np.ndarray]:
  """Deterministic HxWx3 images in [-1, 1]: gradients, a checkerboard and noise."""
  h, w = size
  yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
  checker = np.where((np.arange(h)[:, None] // max(h // 8, 1) + np.arange(w)[None] //
                      max(w // 8, 1)) % 2, 1.0, -1.0)
  noise = np.random.default_rng(0).uniform(-1, 1, (h, w, 3))
  pats = {
      "gradient-horizontal": np.stack([xx, -xx, xx * 0], -1),
      "gradient-vertical": np.stack([yy * 0, yy, -yy], -1),
      "checkerboard": np.stack([checker] * 3, -1),
      "noise": noise,
  }
  return {k: v.astype(np.float32) for k, v in pats.items()}


def read_image(path: str, size: Tuple[int, int]) -> np.ndarray:
  """An image file -> HxWx3 float32 in [-1, 1], resized (bilinear) to the model's size."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"config predict.images: no such file {path!r}")
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
      arr = np.asarray(im, np.float32)
  except OSError as e:
    raise ValueError(f"config predict.images: cannot read {path!r} as an image ({e})") from e
  return arr / 127.5 - 1.0


def predict(config: ml_collections.ConfigDict) -> List[Tuple[str, List[Tuple[int, float]]]]:
  """(image name, [(class, probability)] * top_k) for every image of the config."""
  model, variables = load_backbone(config.model)
  if not model.num_classes:
    raise ValueError(f"{config.model.checkpoint} has no classification head; set "
                     "config.model.num_classes to attach one")
  size = tuple(model.image_size)
  names = [p for p in config.predict.images.split(",") if p]
  images = {n: read_image(n, size) for n in names} if names else test_patterns(size)
  apply = jax.jit(model.apply)
  keys, batch = list(images), config.predict.batch_size
  out = []
  for i in range(0, len(keys), batch):
    chunk = keys[i:i + batch]
    probs = np.asarray(jax.nn.softmax(apply(variables, np.stack([images[k] for k in chunk]))))
    for name, p in zip(chunk, probs):
      top = np.argsort(-p)[:config.predict.top_k]
      out.append((name, [(int(c), float(p[c])) for c in top]))
  return out


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; images go in --config.predict.images")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  arch = checkpoints.inspect(config.model.checkpoint)
  print(f"checkpoint {config.model.checkpoint}: ViT patch {arch.patch_size}, width {arch.width}, "
        f"depth {arch.depth}, {arch.num_heads} heads, pool '{arch.pool_type}', "
        f"{arch.num_classes} classes, trained at {arch.image_size[0]}x{arch.image_size[1]}")
  for name, top in predict(config):
    print(f"{name}: " + ", ".join(f"class {c} ({p:.3f})" for c, p in top))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
