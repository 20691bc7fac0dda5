"""Print top-k predictions of a tuned run or of a pretrained checkpoint for some images.

    python -m vpt_jax.predict --workdir=/tmp/vpt_demo/vpt-deep a.png b.jpg   # a tuned model
    python -m vpt_jax.predict --checkpoint=demo-vit                         # a pretrained one

Without images it runs on a few generated test patterns, so it works offline on a fresh machine.
Images are resized to the model's input size and scaled to [-1, 1].
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from vpt_jax import utils
from vpt_jax.tasks import classification
from vpt_jax.tuning import build, families, workdir
from vpt_jax.weights import npz

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "A tuned run's workdir (vpt_jax.main).")
  flags.DEFINE_string("checkpoint", None, "A pretrained checkpoint: zoo name, .npz path or URL.")
  flags.DEFINE_enum("which", "last", ["last", "best"],
                    "Checkpoint of the tuned run: 'last' (what results.json reports) or 'best' "
                    "(best on validation).")
  flags.DEFINE_integer("top_k", 3, "Classes to print per image.")


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
    model, variables = npz.load_pretrained(FLAGS.checkpoint)
    read = None
    print(f"checkpoint {FLAGS.checkpoint}")
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
