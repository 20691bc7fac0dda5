"""Multi-process training for real: 2 processes x 4 CPU devices, jax.distributed over gloo.

One module-scoped set of runs (the costly part is each process's start and compile; the processes
are forked from one that imported vpt_jax once, `tests/mp_zygote.py`):
  * `ref`: one process with 8 devices; `one`: the same config in the test's own process, one
    device (the data-parallel path equals one device's);
  * `multi`: the same config in 2 processes of 4 devices each, coordinator on localhost;
  * `resumed`: a copy of `multi`'s workdir cut back to its step-1 checkpoint (the state a crash
    right after that save leaves on disk), continued by 2 new processes.
"""

import json
import os
import select
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from conftest import ROOT
from vpt_jax.data import pipeline
from vpt_jax.tuning import loop
from vpt_jax.tuning import rules
from vpt_jax.tuning import workdir as workdir_lib

# 2 steps of batch 96 over 192 digits (48 rows per process, 12 per device), a checkpoint after
# each; 96 validation and test images.
BATCH = 96
ARG = ("vpt-deep,model.checkpoint=tiny-random,optim.epochs=1,optim.warmup_epochs=0,"
       f"eval_every_epochs=1,log_every_steps=1,batch_size={BATCH},checkpoint_every_steps=1,"
       "keep_checkpoints=5,data.train_split=train800[:192],data.val_split=val200[:96],"
       "data.test_split=test[:96]")
STEPS = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


class _Zygote:
  """tests/mp_zygote.py: `vpt_jax.main` processes forked from one that imported everything once
  (each is a process of its own, with its own JAX runtime; only the imports are shared)."""

  def __init__(self, logs):
    self.logs = logs
    self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "mp_zygote.py")],
                                 cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT,
                                                    JAX_PLATFORMS="cpu"),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    self.started = []

  def start(self, name, workdir, rows_dir, devices, distributed=None):
    """One `vpt_jax.main` run; distributed = (process_id, num_processes, port) or None."""
    argv = [f"--config=configs/demo.py:{ARG}", f"--workdir={workdir}"]
    if distributed:
      pid, n, port = distributed
      argv += ["--jax_distributed", f"--coordinator_address=localhost:{port}",
               f"--num_processes={n}", f"--process_id={pid}"]
    log = os.path.join(self.logs, f"{name}.log")
    env = {pipeline.ROWS_LOG_ENV: rows_dir}
    self.proc.stdin.write(json.dumps({"start": name, "devices": devices, "log": log, "env": env,
                                      "argv": argv}) + "\n")
    self.proc.stdin.flush()
    self.started.append(name)

  def two_processes(self, name, workdir, rows_dir):
    port = _free_port()
    for i in range(2):
      self.start(f"{name}{i}", workdir, rows_dir, 4, (i, 2, port))

  def finish(self):
    """{name: output} of the runs started since the last call; each must exit 0."""
    self.proc.stdin.write(json.dumps({"wait": True}) + "\n")
    self.proc.stdin.flush()
    ready, _, _ = select.select([self.proc.stdout], [], [], 600)
    if not ready:
      self.close()
      raise TimeoutError("the multi-process runs did not finish in 600 s")
    codes = json.loads(self.proc.stdout.readline())
    outs = {}
    for name in self.started:
      with open(os.path.join(self.logs, f"{name}.log")) as f:
        outs[name] = f.read()
      assert codes.get(name) == 0, (name, codes, outs[name][-3000:])
    self.started = []
    return outs

  def close(self):
    self.proc.stdin.close()
    self.proc.kill()
    self.proc.wait(timeout=30)


def _trainable(workdir):
  tuned = workdir_lib.load_tuned(str(workdir), which="last")
  return dict(zip(rules.leaf_paths(tuned.variables), jax.tree.leaves(tuned.split()[0])))


def _rows(rows_dir, process):
  with open(os.path.join(rows_dir, f"rows.{process}.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["rows"] for r in records if r["step"] < STEPS}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("multiprocess")
  d = {k: str(base / k) for k in ("ref", "multi", "resumed")}
  zygote = _Zygote(str(base))
  try:
    zygote.start("ref", d["ref"], d["ref"] + "_rows", 8)
    zygote.two_processes("multi", d["multi"], d["multi"] + "_rows")
    # Meanwhile, the same config on this process's single device (test_eight_devices_...).
    d["one"] = str(base / "one")
    one = loop.train_and_evaluate(demo.get_config(ARG), d["one"])
    assert one["devices"] == 1 == jax.device_count()
    outs = zygote.finish()
    # The state on disk after a crash right after step 1's save: later checkpoints never written.
    shutil.copytree(d["multi"], d["resumed"])
    for which in ("last", "best"):
      for step in os.listdir(os.path.join(d["resumed"], "checkpoints", which)):
        if step.isdigit() and int(step) > 1:
          shutil.rmtree(os.path.join(d["resumed"], "checkpoints", which, step))
    os.remove(os.path.join(d["resumed"], "results.json"))
    zygote.two_processes("resumed", d["resumed"], d["resumed"] + "_rows")
    resumed = zygote.finish()
  finally:
    zygote.close()
  return d, {"ref": outs["ref"], "multi": [outs["multi0"], outs["multi1"]],
             "resumed": [resumed["resumed0"], resumed["resumed1"]]}


def test_two_processes_train_like_one_process_with_eight_devices(runs):
  d, _ = runs
  for k in ("ref", "multi"):
    with open(os.path.join(d[k], "results.json")) as f:
      r = json.load(f)
    assert (r["devices"], r["hosts"], r["steps"]) == (8, 1 if k == "ref" else 2, STEPS)
  ref, multi = _trainable(d["ref"]), _trainable(d["multi"])
  assert ref.keys() == multi.keys()
  for path in ref:
    np.testing.assert_allclose(multi[path], ref[path], atol=1e-6, rtol=1e-6, err_msg=path)
  assert any(np.abs(ref[p]).max() > 1e-3 for p in ref)  # training moved the prompts


def test_eight_devices_match_one_device(runs):
  """The trainer's data-parallel steps (batch split over 8 devices) equal one device's.

  Two steps of batch 96, compared to rounding: over many high-lr steps SGD amplifies the
  different summation order of the gradient all-reduce, so a long run would not be comparable.
  """
  d, _ = runs
  ref, one = _trainable(d["ref"]), _trainable(d["one"])
  for path in one:
    np.testing.assert_allclose(ref[path], one[path], atol=1e-6, rtol=1e-6, err_msg=path)
  assert any(np.abs(one[p]).max() > 1e-3 for p in one)


def test_each_process_reads_its_own_half_of_every_batch(runs):
  d, _ = runs
  full = _rows(d["ref"] + "_rows", 0)
  halves = [_rows(d["multi"] + "_rows", p) for p in (0, 1)]
  assert sorted(full) == sorted(halves[0]) == sorted(halves[1]) == list(range(STEPS))
  for step, rows in full.items():
    a, b = halves[0][step], halves[1][step]
    assert len(a) == len(b) == BATCH // 2 and not set(a) & set(b)
    assert a + b == rows  # process 0 the first half of the global batch, process 1 the second


def test_resumed_two_process_run_is_bit_identical(runs):
  d, outs = runs
  assert any("resuming from" in line and "at step 1" in line
             for line in outs["resumed"][0].splitlines())
  # The resumed processes read only the steps after the checkpoint.
  assert sorted(_rows(d["resumed"] + "_rows", 0)) == list(range(1, STEPS))
  multi, resumed = _trainable(d["multi"]), _trainable(d["resumed"])
  for path in multi:
    np.testing.assert_array_equal(resumed[path], multi[path], err_msg=path)


def test_one_checkpoint_from_both_and_only_process_zero_writes(runs):
  d, outs = runs
  last = os.path.join(d["multi"], "checkpoints", "last")
  assert sorted(int(s) for s in os.listdir(last) if s.isdigit()) == list(range(1, STEPS + 1))
  first, second = outs["multi"]
  assert "results: val_top1" in first and "img/s" in first
  for line in ("results:", "img/s", "validation top-1", "model:"):
    assert line not in second
  # One writer: each step's train metrics appear once in metrics.jsonl.
  with open(os.path.join(d["multi"], "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f if "train/loss" in l]
  assert steps == list(range(1, STEPS + 1))
