"""Multi-process training for real: 2 processes x 4 CPU devices, jax.distributed over gloo.

One module-scoped set of runs (the costly part is each process's start and compile):
  * `ref`: one process with 8 devices; `one`: the same config in the test's own process, one
    device (the data-parallel path equals one device's);
  * `multi`: the same config in 2 processes of 4 devices each, coordinator on localhost;
  * `resumed`: a copy of `multi`'s workdir cut back to its step-1 checkpoint (the state a crash
    right after that save leaves on disk), continued by 2 new processes.
"""

import json
import os
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

# 2 steps of batch 400 (200 rows per process, 50 per device), a checkpoint after each.
ARG = ("vpt-deep,model.checkpoint=tiny-random,optim.epochs=1,optim.warmup_epochs=0,"
       "eval_every_epochs=1,log_every_steps=1,batch_size=400,checkpoint_every_steps=1,"
       "keep_checkpoints=5")
STEPS = 2


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, rows_dir, devices, distributed=None):
  """A `vpt_jax.main` process; distributed = (process_id, num_processes, port) or None."""
  cmd = [sys.executable, "-m", "vpt_jax.main", f"--config=configs/demo.py:{ARG}",
         f"--workdir={workdir}"]
  if distributed:
    pid, n, port = distributed
    cmd += ["--jax_distributed", f"--coordinator_address=localhost:{port}",
            f"--num_processes={n}", f"--process_id={pid}"]
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
             **{pipeline.ROWS_LOG_ENV: rows_dir})
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _two_processes(workdir, rows_dir):
  port = _free_port()
  return [_start(workdir, rows_dir, 4, (i, 2, port)) for i in range(2)]


def _finish(procs):
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append(out)
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out
  return outs


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
  procs = [_start(d["ref"], d["ref"] + "_rows", 8)]
  procs += _two_processes(d["multi"], d["multi"] + "_rows")
  # Meanwhile, the same config on this process's single device (test_eight_devices_...).
  d["one"] = str(base / "one")
  one = loop.train_and_evaluate(demo.get_config(ARG), d["one"])
  assert one["devices"] == 1 == jax.device_count()
  outs = _finish(procs)
  # The state on disk after a crash right after step 1's save: later checkpoints never written.
  shutil.copytree(d["multi"], d["resumed"])
  for which in ("last", "best"):
    for step in os.listdir(os.path.join(d["resumed"], "checkpoints", which)):
      if step.isdigit() and int(step) > 1:
        shutil.rmtree(os.path.join(d["resumed"], "checkpoints", which, step))
  os.remove(os.path.join(d["resumed"], "results.json"))
  resumed_outs = _finish(_two_processes(d["resumed"], d["resumed"] + "_rows"))
  return d, {"ref": outs[0], "multi": outs[1:], "resumed": resumed_outs}


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

  Two steps of batch 400, compared to rounding: over many high-lr steps SGD amplifies the
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
    assert len(a) == len(b) == 200 and not set(a) & set(b)
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
