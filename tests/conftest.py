"""Shared test setup: a persistent compilation cache, exact float32 matmuls, fixture paths."""

import os
import time

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

# One persistent compilation cache for the whole run: both xdist workers, and (through the
# environment) every subprocess and notebook kernel the tests start, so a function compiled by one
# test is loaded, not recompiled, by the next one with the same shapes and config. Tiny entries are
# cached too: on a slow host even a 0.1 s compile is worth a file read.
CACHE = os.environ.get("VPT_JAX_TEST_CACHE", os.path.join(ROOT, ".jax_cache"))
for _name, _value in (("jax_compilation_cache_dir", CACHE),
                      ("jax_persistent_cache_min_compile_time_secs", 0.0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
  os.environ[_name.upper()] = str(_value)
  jax.config.update(_name, _value)
# The fixtures' tolerance assumes true float32 matmuls (accelerators default to TF32/bf16 passes).
jax.config.update("jax_default_matmul_precision", "highest")

# Tolerance of the golden fixtures (tests/data/README.md).
ATOL = RTOL = 1e-5


def data_path(name: str) -> str:
  return os.path.join(DATA, name)


def load_io(name: str) -> dict:
  with np.load(data_path(name)) as f:
    return {k: f[k] for k in f.files}


def load_raw(name: str) -> dict:
  with np.load(data_path(name)) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture
def write_npz(tmp_path):
  """Writes a dict of arrays as an .npz in tmp_path and returns its path."""
  def write(arrays: dict, name: str = "ckpt.npz") -> str:
    path = str(tmp_path / name)
    np.savez(path, **arrays)
    return path
  return write


# --- Keeping CI fast (README, Development: the time budget) -------------------------------------

# The test phase's share of CI's ten minutes on a slow 2-core host (the install takes the rest).
BUDGET_S = float(os.environ.get("VPT_JAX_TEST_BUDGET_S", 420))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  """Tests that share a module- or session-scoped fixture run on one xdist worker.

  Each worker builds its own fixtures, so a trained workdir shared by four tests would otherwise
  be trained once per worker. With `--dist loadgroup` (pytest.ini) an xdist_group keeps them
  together; tests without shared fixtures still spread over the workers one by one.
  """
  for item in items:
    info = getattr(item, "_fixtureinfo", None)
    if info is None or item.get_closest_marker("xdist_group"):
      continue
    groups = sorted(
        (f"session-{name}" if d.scope == "session" else item.nodeid.split("::")[0])
        for name, defs in info.name2fixturedefs.items() for d in defs[-1:]
        if d.scope in ("module", "session") and not name.startswith("_")
        and d.baseid != "")  # pytest's own session fixtures (tmp_path_factory, ...) do not count
    if groups:
      item.add_marker(pytest.mark.xdist_group(groups[0]))


_FILE_SECONDS: dict = {}
_START = []


def pytest_sessionstart(session):
  del session
  _START.append(time.time())


def pytest_runtest_logreport(report):
  path = report.nodeid.split("::")[0]
  _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, config):
  """Each test file's share of the summed test time, and the wall time against the budget."""
  if not _FILE_SECONDS or hasattr(config, "workerinput"):
    return
  total = sum(_FILE_SECONDS.values())
  wall = time.time() - _START[0]
  tr = terminalreporter
  tr.section("time per test file (setup + call + teardown, summed over workers)")
  for path, s in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
    tr.write_line(f"{s:8.1f}s {100 * s / total:5.1f}%  {path}")
  tr.write_line(f"{total:8.1f}s summed; {wall:.0f}s wall; budget {BUDGET_S:.0f}s wall on a slow "
                "2-core host (README, Development)")
  if os.environ.get("VPT_JAX_CI_START"):  # set by .ci/run
    install = _START[0] - float(os.environ["VPT_JAX_CI_START"])
    tr.write_line(f"CI: {install:.0f}s venv + install + start-up before the first test, "
                  f"{wall:.0f}s tests")
  if wall > BUDGET_S:
    tr.write_line(f"over the time budget by {wall - BUDGET_S:.0f}s: see the slowest files above",
                  yellow=True, bold=True)
