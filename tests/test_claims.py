"""The protocol split across jobs: work claims (concurrent claimers, a crashed claimer) and shards.

The runs are a fake run function (no training): it records every start and finish in a shared
log, so 'no run done twice, none lost' is counted, and it resumes from a marker a crashed attempt
left (what a real run does with its checkpoint).
"""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
import forked_cli
from vpt_jax.tuning import claims, sweeps

# The claimers are forked from this JAX-initialised process; they never call JAX.
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

CONFIG = '''
import ml_collections
LR_GRID = (1.0, 2.0, 4.0)
WD_GRID = (0.0, 1e-4)
SEEDS = (0, 1)


def get_config(arg=None):
  return ml_collections.ConfigDict(dict(batch_size=256, arg=arg or ""))
'''
GRID = [f"grid/lr{lr:g}_wd{wd:g}" for lr in (1.0, 2.0, 4.0) for wd in (0.0, 1e-4)]
FINALS = ["final/seed0", "final/seed1"]


def fake_run(config, workdir, *, crash_on=None):
  """Writes results.json like a run; val top-1 is best at lr 2 wd 1e-4."""
  base = os.path.dirname(os.path.dirname(workdir))
  sub = os.path.relpath(workdir, base)
  os.makedirs(workdir, exist_ok=True)
  marker = os.path.join(workdir, "partial")
  resumed = os.path.exists(marker)
  _log(base, f"start {sub} {os.getpid()} {'resumed' if resumed else 'fresh'}")
  open(marker, "w").close()
  if sub == crash_on:
    os._exit(3)  # killed mid-run: its claim file stays behind
  time.sleep(0.02)
  val = 0.9 if sub == "grid/lr2_wd0.0001" else 0.5
  results = {"val_top1": None if "final" in config.arg else val, "test_top1": 0.7,
             "arg": config.arg}
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f)
  _log(base, f"done {sub}")
  return results


def _log(base, line):
  with open(os.path.join(base, "log"), "a") as f:
    f.write(line + "\n")


def _events(base):
  with open(os.path.join(base, "log")) as f:
    return [line.split() for line in f]


def _protocol(config, workdir, crash_on=None, **kw):
  run_fn = lambda c, w: fake_run(c, w, crash_on=crash_on)
  return sweeps.run_protocol(config, "", workdir, run_fn=run_fn, poll_s=0.05, **kw)


def _jobs(config, workdir, n, **kw):
  """n concurrent claimers (forked processes); their exit codes."""
  ctx = multiprocessing.get_context("fork")
  procs = [ctx.Process(target=_protocol, args=(config, workdir), kwargs=dict(claim=True, **kw))
           for _ in range(n)]
  for p in procs:
    p.start()
  for p in procs:
    p.join(120)
  return [p.exitcode for p in procs]


@pytest.fixture
def setup(tmp_path):
  config = tmp_path / "fake_config.py"
  config.write_text(CONFIG)
  workdir = tmp_path / "protocol"
  workdir.mkdir()
  return str(config), str(workdir)


def _check_each_run_finished_once(workdir):
  events = _events(workdir)
  done = [e[1] for e in events if e[0] == "done"]
  assert sorted(done) == sorted(GRID + FINALS)  # none lost, none done twice
  with open(os.path.join(workdir, "protocol.json")) as f:
    summary = json.load(f)
  assert summary["best"]["lr"] == 2.0 and summary["best"]["wd"] == 1e-4
  assert [r["seed"] for r in summary["final"]] == [0, 1]
  assert not [f for d in ("grid", "final") for f in os.listdir(os.path.join(workdir, d))
              if ".claim" in f]  # every claim released
  return events


def test_three_concurrent_claimers_share_the_runs(setup):
  config, workdir = setup
  assert _jobs(config, workdir, 3) == [0, 0, 0]
  events = _check_each_run_finished_once(workdir)
  starts = [e for e in events if e[0] == "start"]
  assert len(starts) == len(GRID + FINALS) and all(e[3] == "fresh" for e in starts)
  assert len({e[2] for e in starts}) >= 2  # the work was actually shared


def test_a_crashed_claimers_run_is_taken_over_and_resumed(setup):
  config, workdir = setup
  assert _jobs(config, workdir, 1, crash_on="grid/lr2_wd0") == [3]
  claim = os.path.join(workdir, "grid", "lr2_wd0.claim")
  assert os.path.exists(claim) and claims.is_stale(claim)  # its holder is dead
  assert _jobs(config, workdir, 2) == [0, 0]
  events = _check_each_run_finished_once(workdir)
  again = [e for e in events if e[0] == "start" and e[1] == "grid/lr2_wd0"]
  assert [e[3] for e in again] == ["fresh", "resumed"]
  crashed_pid = again[0][2]
  assert all(e[2] != crashed_pid for e in events if e[0] == "start" and e[1] in GRID[3:] + FINALS)


def test_claims_of_other_hosts_go_stale_by_age_only(tmp_path):
  path = str(tmp_path / "run.claim")
  with open(path, "w") as f:
    json.dump({"token": "t", "host": "elsewhere", "pid": 1}, f)
  assert claims.try_claim(path, stale_after_s=60) is None  # fresh: a live job on another host
  old = time.time() - 120
  os.utime(path, (old, old))
  held = claims.try_claim(path, stale_after_s=60)  # not refreshed for 2 minutes: taken over
  assert held is not None
  with open(path) as f:
    assert json.load(f)["host"] == socket.gethostname()
  assert claims.try_claim(path, stale_after_s=60) is None  # ours now, alive
  held.release()
  assert not os.path.exists(path)


def test_a_held_claim_is_refreshed(tmp_path):
  path = str(tmp_path / "run.claim")
  held = claims.try_claim(path, stale_after_s=0.4)
  old = time.time() - 100
  os.utime(path, (old, old))
  time.sleep(0.3)  # the heartbeat (every 0.1 s) touches it again
  assert time.time() - os.stat(path).st_mtime < 1 and not claims.is_stale(path, 0.4)
  held.release()


def test_shards_split_each_phase(setup):
  config, workdir = setup
  assert _protocol(config, workdir, shard=(0, 2)) is None  # grid rows 0, 2, 4; others missing
  assert sorted(e[1] for e in _events(workdir)) == sorted(GRID[0::2] * 2)
  assert _protocol(config, workdir, shard=(1, 2)) is None  # grid rows 1, 3, 5, then seed 1
  assert _protocol(config, workdir, shard=(0, 2)) is not None  # seed 0, then protocol.json
  events = _check_each_run_finished_once(workdir)
  assert [e[1] for e in events if e[0] == "done"][-2:] == ["final/seed1", "final/seed0"]
  with pytest.raises(ValueError, match="--shard and --claim"):
    _protocol(config, workdir, shard=(0, 2), claim=True)
  with pytest.raises(ValueError, match="--grid_batching trains the whole grid in one job"):
    _protocol(config, workdir, claim=True, grid_batching="vmap")


DRIVER = """
import sys
from absl import app
from vpt_jax import sweep
from vpt_jax.tuning import sweeps
import test_claims
sweeps.loop.train_and_evaluate = test_claims.fake_run
sweep.define_flags()
app.run(sweep.main, argv=sys.argv)
"""


def test_the_sweep_command_honours_shard(setup):
  config, workdir = setup
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
  out = forked_cli.run([sys.executable, "-c", DRIVER, f"--config={config}",
                        f"--workdir={workdir}", "--protocol", "--shard=1/2"], cwd=ROOT, env=env,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  assert "shard 1/2: its grid runs are finished" in out.stdout
  assert sorted(e[1] for e in _events(workdir) if e[0] == "done") == sorted(GRID[1::2])


@pytest.mark.parametrize("text,match", [("2/2", "need 0 <= i < n"), ("1", "expected i/n")])
def test_bad_shard_flags_are_named(text, match):
  with pytest.raises(ValueError, match=f"--shard='{text}': {match}"):
    claims.parse_shard(text)


def test_a_results_file_being_written_is_not_finished(tmp_path):
  """Another job may read results.json mid-write (the race 8 concurrent claimers hit): a run
  whose results do not parse is unfinished, not an error."""
  (tmp_path / "results.json").write_text('{"val_top1": 0.')
  assert sweeps._finished(str(tmp_path)) is None  # pylint: disable=protected-access
  (tmp_path / "results.json").write_text('{"val_top1": 0.5}')
  assert sweeps._finished(str(tmp_path)) == {"val_top1": 0.5}  # pylint: disable=protected-access


def test_a_claim_of_an_exited_but_unreaped_process_is_stale(tmp_path):
  """A crashed job whose parent has not reaped it yet (a zombie) holds nothing: otherwise its
  siblings wait on it until the parent's wait (seen with 8 forked claimers)."""
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  path = str(tmp_path / "run.claim")
  with open(path, "w") as f:
    json.dump({"token": "t", "host": socket.gethostname(), "pid": child.pid}, f)
  deadline = time.time() + 30
  while not claims.is_stale(path) and time.time() < deadline:
    time.sleep(0.05)  # until the child has exited (not reaped: no wait() yet)
  assert claims.is_stale(path)
  child.wait()
