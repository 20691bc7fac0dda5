"""Pictures of a tuned run: t-SNE of its features, training curves, class-token attention.

    python -m vpt_jax.plots tsne --workdir=/tmp/vpt_demo/vpt-deep --out=tsne.png
    python -m vpt_jax.plots curves --workdir=/tmp/vpt_demo/vpt-deep --out=curves.png
    python -m vpt_jax.plots attention --workdir=/tmp/vpt_demo/vpt-deep --out=attention.png
    python -m vpt_jax.plots seg --workdir=/tmp/seg_demo/vpt-deep --out=seg.png

* tsne: the test set's pooled features (intermediate 'head_input', what the head reads) of the
  tuned model next to those of the frozen backbone, coloured by class (the VPT paper's Fig. 9):
  how much prompting reshapes the representation the linear head sees.
* curves: training loss and validation/test top-1 against the step, from workdir/metrics.jsonl.
* attention: for a few test images, what the class token attends to in one layer (default the
  last): a heat map over the patches and a bar per prompt token. The weights are recomputed from
  the layer's input and its LayerNorm_0 / query / key parameters (`class_token_attention`), so no
  model code changes to expose them.
* seg: a segmentation run's test images, ground truth and prediction side by side
  (`vpt_jax.analysis.seg_plots`).

Every command writes one PNG (matplotlib, Agg backend: no display needed); the library is
`vpt_jax.analysis.plots`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import app, flags

from vpt_jax import utils
from vpt_jax.analysis import plots, seg_plots

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (so the module imports cleanly)."""
  flags.DEFINE_string("workdir", None, "A tuned run's workdir (vpt_jax.main).")
  flags.DEFINE_string("out", None, "Output PNG (default: workdir/<command>.png).")
  flags.DEFINE_enum("which", "best", ["best", "last"], "Checkpoint of the tuned run.")
  flags.DEFINE_string("split", "", "Data split for tsne / attention ('' = the run's test split).")
  flags.DEFINE_integer("num_examples", 500, "tsne: examples to embed.")
  flags.DEFINE_enum("features", "head_input", ["head_input", "pooled"], "tsne: which features.")
  flags.DEFINE_integer("num_images", 4, "attention, seg: images to show.")
  flags.DEFINE_integer("layer", -1, "attention: encoder layer (negative counts from the end).")


def main(argv: Sequence[str]) -> None:
  utils.command_setup(argv, extra_args=True)
  commands = plots.COMMANDS + ("seg",)
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError(f"usage: python -m vpt_jax.plots {{{'|'.join(commands)}}} "
                         "--workdir=... [--out=...]")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  command = argv[1]
  out = FLAGS.out or os.path.join(FLAGS.workdir, f"{command}.png")
  if command == "tsne":
    plots.tsne_figure(FLAGS.workdir, out, which=FLAGS.which, split=FLAGS.split,
                      num_examples=FLAGS.num_examples, feature=FLAGS.features)
  elif command == "seg":
    seg_plots.seg_figure(FLAGS.workdir, out, num_images=FLAGS.num_images)
  elif command == "curves":
    plots.curves_figure(FLAGS.workdir, out)
  else:
    plots.attention_figure(FLAGS.workdir, out, which=FLAGS.which, split=FLAGS.split,
                           num_images=FLAGS.num_images, layer=FLAGS.layer)
  print(out)
  sys.stdout.flush()


if __name__ == "__main__":
  define_flags()
  app.run(main)
