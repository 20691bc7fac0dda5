"""Train and evaluate one configuration.

    python -m vpt_jax.main --config=configs/vtab.py:cifar100 --workdir=/tmp/cifar100 \\
        --config.prompt.length=10 --config.optim.lr=0.25

Re-running the same command continues an interrupted run from its last checkpoint. Commands run
from the repository root (configs are imported as the `configs` package).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

from absl import app, flags
import jax
from ml_collections import config_flags

from vpt_jax import utils
from vpt_jax.tuning import loop
from vpt_jax.tuning import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with an argument: configs/vtab.py:cifar100.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
_DISTRIBUTED = flags.DEFINE_bool(
    "jax_distributed", False, "Call jax.distributed.initialize() first (multi-host TPU pods and "
    "GPU clusters); each host then feeds its own share of every batch.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --jax_distributed: host:port of process 0 (default: "
    "detected on TPU pods, SLURM, Open MPI and other clusters JAX knows).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --jax_distributed: the number of processes (default: detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --jax_distributed: this process's index (default: detected).")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's flag parsing, with a bad --config.* override reported in one line (not a traceback
  from inside ml_collections) naming the flag."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    print(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see help on flags.",
          file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    why = " ".join(str(e).replace("\\n", " ").replace("\n", " ").replace("\\'", "'").split())
    overrides = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    why = why.strip(chr(39) + chr(34))
    if isinstance(e, (AttributeError, KeyError)) and (m := re.match(r"^'?(\w+)'?\s*(.*)$", why)):
      why = f"unknown config option {m.group(1)!r}" + (f" ({m.group(2)})" if m.group(2) else "")
    print(f"vpt_jax.main: error: {why}"
          + (f" (flags: {', '.join(overrides)}; every option is in configs/common.py)"
             if overrides else ""), file=sys.stderr)
  sys.exit(2)


def distributed_setup(coordinator_address: str | None, num_processes: int | None,
                      process_id: int | None) -> None:
  """jax.distributed.initialize, with CPU collectives over gloo (without them a CPU-only
  multi-process run cannot all-reduce; TPU and GPU backends ignore the option)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def main(argv) -> None:
  utils.command_setup(argv)
  if _DISTRIBUTED.value:
    distributed_setup(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif any(f.present for f in (flags.FLAGS[n] for n in ("coordinator_address", "num_processes",
                                                        "process_id"))):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need "
                         "--jax_distributed")
  try:
    loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except workdir_lib.SaveFailed as e:
    # A failed orbax save leaves non-daemon threads that never finish: exit without joining them.
    # Their own reports of the same failure (tracebacks, log lines) would otherwise race with, and
    # could follow, the one line that names the workdir and the checkpoint to resume from.
    threading.excepthook = lambda args: None
    logging.disable(logging.CRITICAL)
    print(f"vpt_jax.main: error: {e}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
