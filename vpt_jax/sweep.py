"""Run every arm of a config one after another and print a comparison table.

    python -m vpt_jax.sweep --config=configs/demo.py --workdir=/tmp/vpt_demo

The config file's `get_sweep()` lists the arms (arguments of its `get_config`); repeated `--arm`
flags pick others. Each arm runs in `workdir/<arm>` (so an interrupted sweep resumes where it
stopped) and its results feed the table.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Dict, List, Sequence

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (so the module imports cleanly)."""
  flags.DEFINE_string("config", None, "Config file with get_config(arg) and get_sweep().")
  flags.DEFINE_string("workdir", None, "Parent directory of the arms' workdirs.")
  flags.DEFINE_multi_string("arm", None, "An arm to run (its get_config argument, e.g. "
                            "'vpt-deep,optim.lr=1.0'); repeat for several. Default: get_sweep().")
  flags.mark_flags_as_required(["config", "workdir"])


def load_config_module(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def table(rows: List[Dict]) -> str:
  """A fixed-width text table of arm results."""
  head = ["arm", "protocol", "trainable params", "% of backbone", "val top-1", "test top-1",
          "time (s)"]
  lines = []
  for r in rows:
    fmt = lambda k: "-" if r.get(k) is None else f"{100 * r[k]:.1f}"
    lines.append([r["arm"], r["config"]["protocol"], f"{r['trainable_params']:,}",
                  f"{r['trainable_percent_of_backbone']:.2f}", fmt("val_top1"), fmt("test_top1"),
                  f"{r['wall_time_s']:.0f}"])
  widths = [max(len(x) for x in col) for col in zip(head, *lines)]
  out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
         "-|-".join("-" * w for w in widths)]
  out += [" | ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
  return "\n".join(out)


def run(config_path: str, workdir: str, arms: Sequence[str] | None = None) -> List[Dict]:
  from vpt_jax import train  # pylint: disable=g-import-not-at-top
  module = load_config_module(config_path)
  arms = list(arms or module.get_sweep())
  configs = {arm: module.get_config(arm) for arm in arms}  # all checked before any training
  rows = []
  for arm, config in configs.items():
    print(f"=== {arm} ===", flush=True)
    results = train.train_and_evaluate(config, os.path.join(workdir, arm))
    rows.append({"arm": arm.split(",")[0], **results})
  print(table(rows), flush=True)
  return rows


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  sys.path.insert(0, os.getcwd())  # configs import the `configs` package
  run(FLAGS.config, FLAGS.workdir, FLAGS.arm)


if __name__ == "__main__":
  define_flags()
  app.run(main)
