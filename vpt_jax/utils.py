"""Small helpers every layer may use; this module imports nothing else of vpt_jax.

They live here, at the bottom of the dependency order, because they serve several packages that
must not import each other (a config checker for the model, prompt and tuning sections; the one
atomic .npz writer for weights, pruning masks and compact prompt sets).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, Mapping

import jax
import numpy as np


def check_options(cfg: Mapping[str, Any], default: Mapping[str, Any], section: str) -> None:
  """An unknown key of a config section is an error that names it and lists the known ones."""
  unknown = sorted(set(cfg) - set(default))
  if unknown:
    raise ValueError(f"unknown config option(s) {section}.{f', {section}.'.join(unknown)}; "
                     f"known: {', '.join(sorted(default))}")


def atomic_savez(path: str, arrays: Mapping[str, np.ndarray]) -> None:
  """np.savez under a temporary name, then a rename: a crash never leaves a half-written file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.partial")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary files
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def jsonable(v: Any) -> Any:
  """`v` as plain JSON values (tuples become lists, anything else unknown its str)."""
  return json.loads(json.dumps(v, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def command_setup(argv, *, extra_args: bool = False) -> None:
  """What every command does first: refuse stray arguments, keep absl's INFO logs (orbax logs
  every save and restore) off unless --verbosity is given, and leave the accelerators to JAX
  (TensorFlow serves tf.data only)."""
  # pylint: disable=g-import-not-at-top; absl and TensorFlow are the commands' business only.
  from absl import app, flags, logging
  import tensorflow as tf
  if not extra_args and len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  tf.config.set_visible_devices([], "GPU")


def lead_printer() -> Callable[..., None]:
  """print(..., flush=True) on process 0 of a multi-host run, a no-op elsewhere."""
  if jax.process_index() == 0:
    return lambda *a: print(*a, flush=True)
  return lambda *a: None
