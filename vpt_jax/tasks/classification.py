"""Classification: the loss, and top-k predictions of a model for image files or test patterns.

Images are resized to the model's input size and scaled to [-1, 1]; without images, a few
generated test patterns stand in, so a prediction runs offline on a fresh machine.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy of integer labels, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


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
  # pylint: disable-next=g-import-not-at-top; Pillow is only needed to read files.
  from PIL import Image
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
            batch_size: int = 32, read: Optional[Callable[[str], np.ndarray]] = None
            ) -> List[Tuple[str, List[Tuple[int, float]]]]:
  """(image name, [(class, probability)] * top_k) for each file, or for the test patterns.

  read: path -> model input; a tuned run's own preprocessing (`Tuned.read_image`). Default:
  resize to the model's size and scale to [-1, 1] (a pretrained checkpoint's inputs).
  """
  if not model.num_classes:
    raise ValueError("this model has no classification head")
  size = tuple(model.image_size)
  read = read or (lambda n: read_image(n, size))
  images = ({n: read(n) for n in image_files} if image_files else test_patterns(size))
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
