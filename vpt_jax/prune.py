"""E2VPT pruning and rewinding, end to end: `python -m vpt_jax.prune --config=FILE --workdir=DIR`.

The stages and the files they write are described in `vpt_jax.tuning.prune_pipeline`.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from vpt_jax import utils
from vpt_jax.tuning import prune_pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for every stage of the run.")


def main(argv) -> None:
  if _CONFIG.value is None or not _WORKDIR.value:
    sys.exit("usage: python -m vpt_jax.prune --config=configs/FILE.py[:ARG] --workdir=DIR")
  utils.command_setup(argv)
  prune_pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
