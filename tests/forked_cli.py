"""`subprocess.run` for this repository's command lines, forked from a warm process.

A test that runs `python -m vpt_jax.main ...` pays ~4 s of CPU before the program's first line:
the interpreter starts and imports JAX, TensorFlow and Flax again. `run` instead sends the command
line to a per-test-process zygote (this file run as a script) that has imported those packages
once; the zygote forks, and the child sets the command's environment, working directory, argv and
sys.path, sends its stdout and stderr to files, runs the module, script or `-c` code as
`__main__`, and ends as the interpreter would (non-daemon threads joined, atexit handlers run,
exit code from SystemExit or 1 with the traceback for an uncaught exception). JAX's backend is
first started in the child, so the fork copies no runtime threads (as in tests/fault_zygote.py).

What a fork cannot reproduce falls back to a real interpreter: commands that are not
`sys.executable` with -m/-c/a script, and environments that change a JAX, XLA, TensorFlow or
Python start-up variable (read when the zygote imported those packages). A fresh interpreter is
still exercised by the tests that kill or time real processes (tests/test_main.py's resume test,
the notebook kernels, tests/test_export.py's reproducibility runs, the multi-process runs).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Variables the zygote's imports have already read: a command that changes one runs for real.
STARTUP_PREFIXES = ("JAX_", "XLA_", "TF_", "PYTHON", "LD_", "OMP_", "CUDA_")

_ZYGOTE: List[subprocess.Popen] = []
_ZYGOTE_STARTUP: List[Dict[str, str]] = []  # the start-up variables the running zygote has
_LOCK = threading.Lock()
# CPU seconds of the forked children so far (reaped by the zygote, so not in this process's
# RUSAGE_CHILDREN until the zygote ends): conftest's per-test CPU report adds them.
CHILD_CPU_S = [0.0]


def _startup_env(env: Dict[str, str]) -> Dict[str, str]:
  return {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES) and k != "PYTHONPATH"}


def _zygote_env() -> Dict[str, str]:
  return dict(os.environ, PYTHONPATH=ROOT)


def _zygote() -> subprocess.Popen:
  if not _ZYGOTE or _ZYGOTE[0].poll() is not None:
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], cwd=ROOT,
                            env=_zygote_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    _ZYGOTE[:] = [proc]
    _ZYGOTE_STARTUP[:] = [_startup_env(_zygote_env())]
    atexit.register(_stop, proc)
    if proc.stdout.readline().strip() != "ready":
      raise RuntimeError("tests/forked_cli.py: the zygote did not start")
  return _ZYGOTE[0]


def _stop(proc: subprocess.Popen) -> None:
  if proc.poll() is None:
    proc.stdin.close()
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()


def forkable(cmd: Sequence[str], env: Optional[Dict[str, str]]) -> bool:
  """Whether `cmd` under `env` runs in a fork exactly as in a new interpreter."""
  if len(cmd) < 2 or cmd[0] != sys.executable:
    return False
  if cmd[1] in ("-m", "-c") and len(cmd) < 3:
    return False
  if cmd[1].startswith("-") and cmd[1] not in ("-m", "-c"):
    return False
  env = os.environ if env is None else env
  zygote = _ZYGOTE_STARTUP[0] if _ZYGOTE and _ZYGOTE[0].poll() is None else _startup_env(
      _zygote_env())
  return _startup_env(dict(env)) == zygote


def run(cmd: Sequence[str], *, cwd: str = ROOT, env: Optional[Dict[str, str]] = None,
        timeout: float = 600) -> subprocess.CompletedProcess:
  """`subprocess.run(cmd, cwd=, env=, capture_output=True, text=True, timeout=)`, forked from the
  zygote when `forkable`; raises subprocess.TimeoutExpired like it after killing the child."""
  cmd = list(cmd)
  if not forkable(cmd, env):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  with _LOCK, tempfile.TemporaryDirectory() as tmp:
    out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    request = {"argv": cmd[1:], "cwd": os.path.abspath(cwd),
               "env": dict(os.environ if env is None else env), "stdout": out, "stderr": err,
               "timeout": timeout}
    zygote = _zygote()
    zygote.stdin.write(json.dumps(request) + "\n")
    zygote.stdin.flush()
    reply = json.loads(zygote.stdout.readline())
    CHILD_CPU_S[0] += reply["cpu_s"]
    with open(out, encoding="utf-8", errors="replace") as f:
      stdout = f.read()
    with open(err, encoding="utf-8", errors="replace") as f:
      stderr = f.read()
  if reply["code"] is None:
    raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
  return subprocess.CompletedProcess(cmd, reply["code"], stdout, stderr)


# --- The zygote -----------------------------------------------------------------------------


def _exit_code(e: SystemExit) -> int:
  if e.code is None:
    return 0
  if isinstance(e.code, int):
    return e.code
  print(e.code, file=sys.stderr)
  return 1


def _child(request: dict) -> None:
  """Runs one command line as the interpreter would, then leaves the process (never returns)."""
  code = 1
  try:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
      os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    argv = request["argv"]
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [p for p in extra if p not in sys.path] + sys.path
    import runpy  # pylint: disable=g-import-not-at-top
    try:
      if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, request["cwd"])
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
      elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path.insert(0, "")
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})  # pylint: disable=exec-used
      else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")
      code = 0
    except SystemExit as e:
      code = _exit_code(e)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      code = 1
    # The interpreter's own shutdown: join non-daemon threads, then the atexit handlers.
    threading._shutdown()  # pylint: disable=protected-access
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)  # pylint: disable=protected-access


def serve() -> None:
  # What the repository's programs import (not their __main__ modules: those define absl flags,
  # and run again in each child).
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  from configs import demo, seg_demo  # pylint: disable=g-import-not-at-top,unused-import
  from vpt_jax.analysis import plots, report  # pylint: disable=g-import-not-at-top,unused-import
  from vpt_jax.tuning import loop, seg_loop, sweeps  # pylint: disable=g-import-not-at-top,unused-import
  print("ready", flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
      _child(request)
    deadline = time.time() + request["timeout"]
    code = None
    while True:
      done, status, usage = os.wait4(pid, os.WNOHANG)
      if done:
        code = os.waitstatus_to_exitcode(status)
        break
      if time.time() > deadline:
        os.kill(pid, signal.SIGKILL)
        _, _, usage = os.wait4(pid, 0)
        break
      time.sleep(0.01)
    print(json.dumps({"code": code, "cpu_s": usage.ru_utime + usage.ru_stime}), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, ROOT)
  serve()
