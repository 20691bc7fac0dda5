"""Run several configurations one after another: a config's arms, or the paper's protocol.

    python -m vpt_jax.sweep --config=configs/demo.py --workdir=/tmp/vpt_demo
    python -m vpt_jax.sweep --config=configs/vtab.py:cifar100 --workdir=/tmp/cifar100 --protocol

What runs, in which workdirs, and what `protocol.json` holds: `vpt_jax.tuning.sweeps`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from vpt_jax import utils
from vpt_jax.tuning import claims, sweeps

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Command-line flags, defined only when run as a command (so the module imports cleanly)."""
  flags.DEFINE_string("config", None, "Config file with get_config(arg) and get_sweep().")
  flags.DEFINE_string("workdir", None, "Parent directory of the arms' workdirs.")
  flags.DEFINE_multi_string("arm", None, "An arm to run (its get_config argument, e.g. "
                            "'vpt-deep,optim.lr=1.0'); repeat for several. Default: get_sweep().")
  flags.DEFINE_bool("protocol", False, "Run the lr x wd grid, selection and seeded final runs.")
  flags.DEFINE_list("lr_grid", None, "Override the config's LR_GRID (per 256 images).")
  flags.DEFINE_list("wd_grid", None, "Override the config's WD_GRID.")
  flags.DEFINE_list("seeds", None, "Override the config's SEEDS.")
  flags.DEFINE_list("length_grid", None, "Prompt lengths to search with --protocol (default: the "
                    "config's PROMPT_LENGTH_GRID, if any).")
  flags.DEFINE_list("kv_length_grid", None, "E2VPT key-value prompt lengths to search with "
                    "--protocol (default: the config's KV_LENGTH_GRID, if any).")
  flags.DEFINE_string("shard", None, "With --protocol: i/n runs every n-th run of each phase from "
                      "the i-th (e.g. a SLURM array: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT);"
                      " rerun any shard after all end to continue with the next phase.")
  flags.DEFINE_bool("claim", False, "With --protocol: claim runs one at a time on the shared "
                    "workdir (any number of jobs; runs of dead jobs are taken over), waiting for "
                    "the others' before the next phase.")
  flags.DEFINE_float("claim_stale_s", claims.STALE_AFTER_S, "With --claim: a claim not refreshed "
                     "for this long is a dead host's and is taken over.")
  flags.DEFINE_enum("grid_batching", None, ["vmap", "map"], "With --protocol, for head-only "
                    "protocols (linear, mlp-k) on cached features: train the lr x wd grid at once "
                    "(vmap over the points, or a lax.map loop that is bit-identical to separate "
                    "runs). Default: one run per point.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  utils.command_setup(argv)
  sys.path.insert(0, os.getcwd())  # configs import the `configs` package
  path, _, arg = FLAGS.config.partition(":")
  if not FLAGS.protocol and (FLAGS.shard or FLAGS.claim or FLAGS.grid_batching):
    raise app.UsageError("--shard, --claim and --grid_batching apply to --protocol: add it")
  if FLAGS.protocol:
    try:
      shard = claims.parse_shard(FLAGS.shard) if FLAGS.shard else None
    except ValueError as e:
      raise app.UsageError(str(e)) from None
    sweeps.run_protocol(path, arg, FLAGS.workdir, lr_grid=FLAGS.lr_grid,
                        wd_grid=FLAGS.wd_grid, seeds=FLAGS.seeds, length_grid=FLAGS.length_grid,
                        kv_length_grid=FLAGS.kv_length_grid, shard=shard, claim=FLAGS.claim,
                        stale_after_s=FLAGS.claim_stale_s, grid_batching=FLAGS.grid_batching)
  else:
    sweeps.run(path, FLAGS.workdir, FLAGS.arm)


if __name__ == "__main__":
  define_flags()
  app.run(main)
