"""Print top-k predictions of a tuned run or of a pretrained checkpoint for some images.

    python -m vpt_jax.predict --workdir=/tmp/vpt_demo/vpt-deep a.png b.jpg   # a tuned model
    python -m vpt_jax.predict --checkpoint=demo-vit                         # a pretrained one
    python -m vpt_jax.predict --checkpoint=mocov3-vit-b16 a.png   # a PyTorch file, its own head

Without images it runs on a few generated test patterns, so it works offline on a fresh machine.
Images are resized to the model's input size and scaled to [-1, 1] (Google .npz checkpoints) or
normalised with the ImageNet mean/std (PyTorch files: MoCo v3's linear-evaluation checkpoint, read
through `weights.backbones.load_pretrained` with its classifier kept). A tuned run applies its own
preprocessing.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Sequence, Tuple

import numpy as np
from absl import app, flags

from vpt_jax import utils
from vpt_jax.data import pipeline
from vpt_jax.tasks import classification
from vpt_jax.tuning import build, families, workdir
from vpt_jax.weights import backbones

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "A tuned run's workdir (vpt_jax.main).")
  flags.DEFINE_string("checkpoint", None, "A pretrained checkpoint: zoo name, .npz path or URL.")
  flags.DEFINE_enum("which", "last", ["last", "best"],
                    "Checkpoint of the tuned run: 'last' (what results.json reports) or 'best' "
                    "(best on validation).")
  flags.DEFINE_integer("top_k", 3, "Classes to print per image.")
  flags.DEFINE_integer("num_heads", 0, "PyTorch ViT files only (they do not store it): attention "
                       "heads; 0 = width // 64, as the published ViT-B/L/H.")


def load_checkpoint(spec: str, *, num_heads: int = 0) -> Tuple[Any, dict, Callable, str]:
  """(model, variables, read, input description) of a pretrained checkpoint with its classifier.

  read: image path -> the model's input, normalised as the checkpoint's family was trained.
  """
  if not backbones.is_pytorch(spec):
    model, variables = backbones.load_pretrained(spec, family="vit")
    return model, variables, None, "scaled to [-1, 1]"
  model, variables = backbones.load_pretrained(spec, num_heads=num_heads, head=True)
  mean = np.asarray(pipeline.IMAGENET_MEAN, np.float32)
  std = np.asarray(pipeline.IMAGENET_STD, np.float32)

  def read(path: str) -> np.ndarray:
    pixels = (classification.read_image(path, tuple(model.image_size)) + 1.0) / 2.0
    return (pixels - mean) / std
  return model, variables, read, "ImageNet mean/std"


def main(argv: Sequence[str]) -> None:
  utils.command_setup(argv, extra_args=True)
  if bool(FLAGS.workdir) == bool(FLAGS.checkpoint):
    raise app.UsageError("give exactly one of --workdir (a tuned run) or --checkpoint")
  if FLAGS.workdir:
    tuned = workdir.load_tuned(FLAGS.workdir, which=FLAGS.which)
    model, variables = tuned
    read = tuned.read_image
    print(f"tuned run {FLAGS.workdir}: {tuned.describe()}; preprocessing "
          f"{build.preprocessing_spec(tuned.config)}")
  else:
    model, variables, read, inputs = load_checkpoint(FLAGS.checkpoint, num_heads=FLAGS.num_heads)
    print(f"checkpoint {FLAGS.checkpoint}; inputs {inputs}")
  size = getattr(model, "patch_size", None)   # a ConvNet has none; Swin's is one int
  patch = "" if size is None else f" patch {tuple(size) if hasattr(size, '__len__') else size}"
  print(f"{families.family_of(model) or 'ViT'}{patch}, width {model.width}, depth {model.depth}, "
        f"{model.num_classes} classes, input {model.image_size[0]}x{model.image_size[1]}")
  for name, top in classification.predict(model, variables, argv[1:], FLAGS.top_k, read=read):
    print(f"{name}: " + ", ".join(f"class {c} ({p:.3f})" for c, p in top))
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
