"""Shared test setup: a persistent compilation cache, exact float32 matmuls, fixture paths."""

import gc
import os
import re
import resource
import sys
import time

# Bytecode is written even where PYTHONDONTWRITEBYTECODE is set (as on the CI host): CI installs
# with `pip install --no-compile`, so without it every test process, subprocess and notebook
# kernel would compile TensorFlow's, JAX's and the other packages' sources again on import (17.6 s
# against 6.6 s of CPU for `import tensorflow, jax, flax, optax, orbax.checkpoint` on the slow
# host). The first process to import a module writes its .pyc; the others read it.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")

# One persistent compilation cache for the whole run: every xdist worker, and (through the
# environment) every subprocess and notebook kernel the tests start, so a function compiled by one
# test is loaded, not recompiled, by the next one with the same shapes and config. Tiny entries are
# cached too: on a slow host even a 0.1 s compile is worth a file read.
CACHE = os.environ.get("VPT_JAX_TEST_CACHE", os.path.join(ROOT, ".jax_cache"))
for _name, _value in (("jax_compilation_cache_dir", CACHE),
                      ("jax_persistent_cache_min_compile_time_secs", 0.0),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
  os.environ[_name.upper()] = str(_value)
  jax.config.update(_name, _value)
# The suite compiles hundreds of small XLA programs and runs each only briefly, so compile time
# is most of its CPU: three XLA:CPU settings cut it by more than half for slower tiny-model steps.
# LLVM's optimisation level 0 (test_fast_path, cold cache: 64 s of CPU against 108 s), and XLA's
# older elemental loop emitters for fusions instead of the MLIR fusion emitters (test_train, cold
# cache: 14 s of XLA compile against 31 s), and each program's machine code generated as one
# LLVM module rather than split for parallel code generation (the xdist workers already use both
# cores; test_fast_path, cold cache: 14.2 s of XLA compile against 17.2 s). The HLO, hence what
# is computed, is the same;
# exactness tests compare runs under the same flags or within a tolerance. Exported through the
# environment, so the tests' subprocesses and notebook kernels compile the same way;
# VPT_JAX_TEST_XLA_OPT=1 keeps XLA's defaults.
O0_FLAG = "--xla_backend_optimization_level=0"
TEST_XLA_FLAGS = (O0_FLAG, "--xla_cpu_use_fusion_emitters=false",
                  "--xla_cpu_parallel_codegen_split_count=1")
if os.environ.get("VPT_JAX_TEST_XLA_OPT", "0") == "0":
  _flags = os.environ.get("XLA_FLAGS", "").split()
  os.environ["XLA_FLAGS"] = " ".join(_flags + [f for f in TEST_XLA_FLAGS if f not in _flags])
# TensorFlow (tf.data only, here) imports Keras 3 eagerly, and Keras imports scikit-learn's
# wrappers: 2 of the 5 CPU seconds of `import tensorflow` in every test process and subprocess.
# vpt_jax never uses Keras; asking TensorFlow for the legacy Keras package, which is not
# installed, makes it skip that import (tf.keras stays unavailable, and unused).
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# The fixtures' tolerance assumes true float32 matmuls (accelerators default to TF32/bf16 passes).
jax.config.update("jax_default_matmul_precision", "highest")

# A quarter of the demo's digits for end-to-end runs whose property does not depend on how much
# they learn (resume, checkpoints, faults, serving, pruning's stages): 200 train examples (4
# steps of 64, the last one partial), 100 validation, 200 test. The tests' run time is mostly
# these steps.
SMALL_DIGITS = ("data.train_split=train800[:200],data.val_split=val200[:100],"
                "data.test_split=test[:200]")
SMALL_TRAIN = 200

# Python's cyclic garbage collector: JAX's tracing allocates millions of short-lived objects, and
# at the default thresholds a collection runs every 700 allocations, walking the large object
# graph of TensorFlow, JAX and the test modules each time it reaches the older generations. The
# imported modules are frozen out of the collector (gc.freeze) and collections run less often:
# test_fast_path + test_backbone_training, 72-75 s of CPU against 77-78 s.
gc.freeze()
gc.set_threshold(50_000, 50, 50)

# Tolerance of the golden fixtures (tests/data/README.md).
ATOL = RTOL = 1e-5


def optimised_env(env: dict) -> dict:
  """`env` without the tests' LLVM level 0: for a subprocess that runs the same compiled programs
  many times (the fault-injection runs), where run time outweighs the one compile."""
  flags = env.get("XLA_FLAGS", "").replace(O0_FLAG, "").strip()
  return dict(env, XLA_FLAGS=flags)


def jit_apply(model, variables, *args, **kwargs):
  """`model.apply(variables, *args, **kwargs)` as one compiled program. An eager apply compiles
  each of the model's ops on its own for every new shape (~13 ms each here: a tiny ViT's eager
  forward costs more than compiling it whole), so reference forwards in the tests are jitted;
  keyword arguments (mutable, train, ...) are static."""
  return jax.jit(lambda v, *a: model.apply(v, *a, **kwargs))(variables, *args)


def jit_init(model, rng, *args, **kwargs):
  """`model.init(rng, *args, **kwargs)` as one compiled program (see jit_apply)."""
  return jax.jit(lambda r, *a: model.init(r, *a, **kwargs))(rng, *args)


def data_path(name: str) -> str:
  return os.path.join(DATA, name)


def load_io(name: str) -> dict:
  with np.load(data_path(name)) as f:
    return {k: f[k] for k in f.files}


def load_raw(name: str) -> dict:
  with np.load(data_path(name)) as f:
    return {k: f[k] for k in f.files}


def adam_steps(loss_fn, trainable, *, steps: int = 6, lr: float = 3e-2):
  """A few jitted Adam steps on `trainable` (the families' "prompts and head learn" tests).

  Returns (losses, gradients of the first step, gradients of the last step).
  """
  import optax  # pylint: disable=g-import-not-at-top
  opt = optax.adam(lr)

  @jax.jit
  def step(tr, st):
    loss, g = jax.value_and_grad(loss_fn)(tr)
    upd, st = opt.update(g, st, tr)
    return optax.apply_updates(tr, upd), st, loss, g

  state, losses, grads = opt.init(trainable), [], []
  for _ in range(steps):
    trainable, state, loss, g = step(trainable, state)
    losses.append(float(loss))
    grads.append(g)
  return losses, grads[0], grads[-1]


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


def _shared_fixture_tests(path: str) -> frozenset:
  """Names of the tests in `path` that use a module- or session-scoped fixture, directly or
  through other fixtures of the file (read from the source, as the xdist controller collects
  nothing)."""
  import ast  # pylint: disable=g-import-not-at-top
  try:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
      tree = ast.parse(f.read())
  except (OSError, SyntaxError):
    return frozenset()
  fixtures, shared = {}, set()
  for node in tree.body:
    if not isinstance(node, ast.FunctionDef):
      continue
    for dec in node.decorator_list:
      if "fixture" in ast.unparse(dec):
        fixtures[node.name] = {a.arg for a in node.args.args}
        if re.search(r"scope\s*=\s*['\"](module|session)['\"]", ast.unparse(dec)):
          shared.add(node.name)
  changed = True
  while changed:  # fixtures that use a shared fixture share it too
    changed = False
    for name, args in fixtures.items():
      if name not in shared and args & shared:
        shared.add(name)
        changed = True
  return frozenset(node.name for node in tree.body
                   if isinstance(node, ast.FunctionDef) and node.name.startswith("test")
                   and {a.arg for a in node.args.args} & shared)


def pytest_xdist_make_scheduler(config, log):
  """Tests that share a module- or session-scoped fixture run on one xdist worker.

  Each worker builds its own fixtures, so a trained workdir shared by four tests would otherwise
  be trained once per worker. Such tests are scheduled as one unit per file; every other test is
  sent on its own, as `--dist load` does. (xdist's own `loadgroup` cannot be used: it renames node
  ids in a way pytest 9 ignores.)
  """
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top
  cache = {}

  class SharedFixtureScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      path, _, rest = nodeid.partition("::")
      if path not in cache:
        cache[path] = _shared_fixture_tests(path)
      return path if rest.split("[")[0] in cache[path] else nodeid

  return SharedFixtureScheduling(config, log)


# The longest tests and fixture groups first (as measured in CI): one of them started last would
# leave the other worker idle at the end.
LONGEST_FIRST = ("tests/test_faults.py::test_sigkill", "tests/test_multiprocess.py",
                 "tests/test_colabs.py", "tests/test_export.py::test_pretraining",
                 "tests/test_seg_main.py", "tests/test_backbone_training.py",
                 "tests/test_memory.py::test_frozen_weights_sharded", "tests/test_report.py",
                 "tests/test_pruning.py", "tests/test_baselines.py", "tests/test_serving.py",
                 "tests/test_main.py::test_resume_after_kill", "tests/test_swin.py",
                 "tests/test_features.py::test_cached_and_uncached")


def pytest_collection_finish(session):
  del session
  gc.freeze()  # and the test modules with what they imported (see gc.set_threshold above)


def pytest_collection_modifyitems(config, items):
  del config

  def rank(item):
    return next((i for i, p in enumerate(LONGEST_FIRST) if item.nodeid.startswith(p)),
                len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: every other test keeps its place


_FILE_SECONDS: dict = {}
_FILE_CPU: dict = {}
_FILE_JAX: dict = {}   # path -> [trace s, lower s, compile s] in the test processes
# JAX's own timings of the three stages before a jitted function first runs, summed per phase of
# each test: the report splits each file's time into them (subprocesses are not counted).
_JAX_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": 0,
               "/jax/core/compile/jaxpr_to_mlir_module_duration": 1,
               "/jax/core/compile/backend_compile_duration": 2}
_JAX_MARK = [0.0, 0.0, 0.0]


def _on_jax_event(event: str, duration: float, **_) -> None:
  if event in _JAX_EVENTS:
    _JAX_MARK[_JAX_EVENTS[event]] += duration


jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
_TESTS: dict = {}   # node id -> [wall s, CPU s]
_START = []
_CPU_MARK = []


def _cpu_s() -> float:
  """CPU seconds of this process (all threads), of its finished child processes, and of the
  command lines forked for it (tests/forked_cli.py; their zygote is reaped only at the end)."""
  own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  forked = sys.modules.get("forked_cli")
  return (own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
          + (forked.CHILD_CPU_S[0] if forked else 0.0))


def pytest_sessionstart(session):
  del session
  _START.append(time.time())


def pytest_runtest_logstart(nodeid, location):
  del nodeid, location
  _CPU_MARK[:] = [_cpu_s()]
  _JAX_MARK[:] = [0.0, 0.0, 0.0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """Each phase's report carries the CPU seconds it used (worker and reaped subprocesses): a test
  whose CPU is far below its wall time waits on something (README, Development)."""
  del item, call
  outcome = yield
  if _CPU_MARK:
    now = _cpu_s()
    outcome.get_result().user_properties.append(("cpu_s", now - _CPU_MARK[0]))
    _CPU_MARK[0] = now
  outcome.get_result().user_properties.append(("jax_s", tuple(_JAX_MARK)))
  _JAX_MARK[:] = [0.0, 0.0, 0.0]


def pytest_runtest_logreport(report):
  path = report.nodeid.split("::")[0]
  _FILE_SECONDS[path] = _FILE_SECONDS.get(path, 0.0) + report.duration
  props = dict(report.user_properties)
  cpu = props.get("cpu_s", 0.0)
  _FILE_CPU[path] = _FILE_CPU.get(path, 0.0) + cpu
  jax_s = props.get("jax_s", (0.0, 0.0, 0.0))
  _FILE_JAX[path] = [a + b for a, b in zip(_FILE_JAX.get(path, [0.0] * 3), jax_s)]
  test = _TESTS.setdefault(report.nodeid, [0.0, 0.0])
  test[0] += report.duration
  test[1] += cpu


def pytest_terminal_summary(terminalreporter, config):
  """Each test file's share of the summed test time, and the wall time against the budget."""
  if not _FILE_SECONDS or hasattr(config, "workerinput"):
    return
  total = sum(_FILE_SECONDS.values())
  wall = time.time() - _START[0]
  tr = terminalreporter
  tr.section("time per test file (setup + call + teardown, summed over workers; CPU seconds; "
             "of those, JAX tracing, lowering, XLA compiling in the test processes)")
  for path, s in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1]):
    trace, lower, comp = _FILE_JAX.get(path, (0.0, 0.0, 0.0))
    tr.write_line(f"{s:8.1f}s {100 * s / total:5.1f}% {_FILE_CPU.get(path, 0.0):7.1f}s CPU "
                  f"{trace:6.1f} {lower:6.1f} {comp:6.1f}  {path}")
  cpu = sum(_FILE_CPU.values())
  trace, lower, comp = (sum(v[i] for v in _FILE_JAX.values()) for i in range(3))
  tr.write_line(f"JAX in the test processes: {trace:.0f}s tracing, {lower:.0f}s lowering, "
                f"{comp:.0f}s compiling (or reading the cache)")
  tr.write_line(f"{total:8.1f}s summed; {cpu:.0f}s CPU; {wall:.0f}s wall; budget {BUDGET_S:.0f}s "
                "wall on a slow 2-core host (README, Development)")
  idle = sorted(_TESTS.items(), key=lambda kv: kv[1][1] - kv[1][0])[:8]
  tr.write_line("most waiting (wall - CPU; under load, CPU contention counts as waiting too):")
  for nodeid, (w, c) in idle:
    tr.write_line(f"{w - c:8.1f}s  ({w:.1f}s wall, {c:.1f}s CPU)  {nodeid}")
  if os.environ.get("VPT_JAX_CI_START"):  # set by .ci/run
    install = _START[0] - float(os.environ["VPT_JAX_CI_START"])
    tr.write_line(f"CI: {install:.0f}s venv + install + start-up before the first test, "
                  f"{wall:.0f}s tests")
  if wall > BUDGET_S:
    tr.write_line(f"over the time budget by {wall - BUDGET_S:.0f}s: see the slowest files above",
                  yellow=True, bold=True)
