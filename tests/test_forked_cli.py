"""tests/forked_cli.py: a forked command line ends as the same command in a new interpreter."""

import os
import subprocess
import sys

import pytest

import forked_cli
from conftest import ROOT

PROGRAM = r"""
import atexit, os, sys, threading, time
print("argv", sys.argv[1:], "cwd", os.path.basename(os.getcwd()), "var", os.environ.get("VAR"))
print("to stderr", file=sys.stderr)
atexit.register(lambda: print("atexit ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread joined", flush=True))).start()
how = sys.argv[1]
if how == "exit3":
  sys.exit(3)
if how == "message":
  sys.exit("a message")
if how == "raise":
  raise KeyError("boom")
"""


@pytest.mark.parametrize("how", ["ok", "exit3", "message", "raise"])
def test_forked_run_equals_a_new_interpreter(how, tmp_path):
  script = tmp_path / "prog.py"
  script.write_text(PROGRAM)
  env = dict(os.environ, PYTHONPATH=ROOT, VAR="set")
  for cmd in ([sys.executable, "-c", PROGRAM, how, "x"], [sys.executable, str(script), how, "x"]):
    want = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=60)
    got = forked_cli.run(cmd, cwd=str(tmp_path), env=env, timeout=60)
    assert forked_cli.forkable(cmd, env)
    assert got.returncode == want.returncode, (got.stderr, want.stderr)
    assert got.stdout == want.stdout  # argv, cwd, environment, joined thread, atexit handler
    if how == "raise":  # the traceback's last line; its frames name the runner's own
      assert got.stderr.splitlines()[-1] == want.stderr.splitlines()[-1] == "KeyError: 'boom'"
    else:
      assert got.stderr == want.stderr


def test_a_module_runs_as_main_with_the_working_directory_on_the_path(tmp_path):
  (tmp_path / "mod_here.py").write_text("import sys\nprint(__name__, sys.argv)\n")
  got = forked_cli.run([sys.executable, "-m", "mod_here", "--flag"], cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
  assert got.returncode == 0 and got.stdout.split("[")[0].strip() == "__main__"
  assert got.stdout.strip().endswith(", '--flag']") and "mod_here.py" in got.stdout


def test_a_hung_child_is_killed_at_the_timeout():
  cmd = [sys.executable, "-c", "import time; time.sleep(60)"]
  with pytest.raises(subprocess.TimeoutExpired):
    forked_cli.run(cmd, env=dict(os.environ, PYTHONPATH=ROOT), timeout=1)


def test_start_up_variables_make_a_real_interpreter_run():
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = [sys.executable, "-c", "pass"]
  assert forked_cli.forkable(cmd, env)
  for key in ("XLA_FLAGS", "JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL", "PYTHONHASHSEED"):
    changed = dict(env, **{key: env.get(key, "") + " changed"})
    assert not forked_cli.forkable(cmd, changed), key
  assert not forked_cli.forkable([sys.executable, "-X", "importtime", "-c", "pass"], env)
  assert not forked_cli.forkable(["/bin/true"], env)
