"""Print top-k predictions of a tuned run or of a pretrained checkpoint for some images.

    python -m vpt_jax.predict --workdir=/tmp/vpt_demo/vpt-deep a.png b.jpg   # a tuned model
    python -m vpt_jax.predict --checkpoint=demo-vit                         # a pretrained one

Without images it runs on a few generated test patterns, so it works offline on a fresh machine.
Images are resized to the model's input size and scaled to [-1, 1].
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List, Sequence, Tuple

import jax
import numpy as np
from absl import app, flags, logging

from vpt_jax import checkpoints

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "A tuned run's workdir (vpt_jax.main).")
  flags.DEFINE_string("checkpoint", None, "A pretrained checkpoint: zoo name, .npz path or URL.")
  flags.DEFINE_enum("which", "best", ["best", "last"], "Checkpoint of the tuned run.")
  flags.DEFINE_integer("top_k", 3, "Classes to print per image.")


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
    raise FileNotFoundError(f"image file {path!r} not found")
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
      arr = np.asarray(im, np.float32)
  except OSError as e:
    raise ValueError(f"cannot read {path!r} as an image ({e})") from e
  return arr / 127.5 - 1.0


def predict(model, variables, image_files: Sequence[str] = (), top_k: int = 3,
            batch_size: int = 32) -> List[Tuple[str, List[Tuple[int, float]]]]:
  """(image name, [(class, probability)] * top_k) for each file, or for the test patterns."""
  if not model.num_classes:
    raise ValueError("this model has no classification head")
  size = tuple(model.image_size)
  images = ({n: read_image(n, size) for n in image_files} if image_files
            else test_patterns(size))
  apply = jax.jit(model.apply)
  keys = list(images)
  out = []
  for i in range(0, len(keys), batch_size):
    chunk = keys[i:i + batch_size]
    probs = np.asarray(jax.nn.softmax(apply(variables, np.stack([images[k] for k in chunk]))))
    for name, p in zip(chunk, probs):
      top = np.argsort(-p)[:top_k]
      out.append((name, [(int(c), float(p[c])) for c in top]))
  return out


def main(argv: Sequence[str]) -> None:
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise app.UsageError("give exactly one of --workdir (a tuned run) or --checkpoint")
  if FLAGS.workdir:
    from vpt_jax import checkpointing  # pylint: disable=g-import-not-at-top
    model, variables = checkpointing.load_tuned(FLAGS.workdir, which=FLAGS.which)
    print(f"tuned run {FLAGS.workdir} ({FLAGS.which} checkpoint)")
  else:
    model, variables = checkpoints.load_pretrained(FLAGS.checkpoint)
    print(f"checkpoint {FLAGS.checkpoint}")
  print(f"ViT patch {tuple(model.patch_size)}, width {model.width}, depth {model.depth}, "
        f"{model.num_classes} classes, input {model.image_size[0]}x{model.image_size[1]}")
  for name, top in predict(model, variables, argv[1:], FLAGS.top_k):
    print(f"{name}: " + ", ".join(f"class {c} ({p:.3f})" for c, p in top))
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
