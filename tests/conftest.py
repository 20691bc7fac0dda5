"""Shared test setup: a persistent compilation cache, exact float32 matmuls, fixture paths."""

import os

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("VPT_JAX_TEST_CACHE", os.path.join(ROOT, ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
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
