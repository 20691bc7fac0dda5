"""Imports vpt_jax once, then forks `vpt_jax.main` processes from it (tests/test_multiprocess.py).

Each child is a process of its own, as if started with `python -m vpt_jax.main ...`, minus the
~4 CPU seconds of importing TensorFlow, JAX and flax again (5 processes per test run). One JSON
object per line on stdin:

    {"start": name, "devices": n, "log": path, "env": {...}, "argv": [...]}
        forks a child: sets the environment, gives JAX n CPU devices, runs vpt_jax.main with argv,
        its stdout and stderr into the log file;
    {"wait": true}
        waits for every child started so far and answers one line: {name: exit code, ...}.

JAX's backend is first started in each child, so the fork copies no runtime threads.
"""

import json
import os
import sys

from absl import app
import jax

from configs import demo  # pylint: disable=unused-import; imported before forking
from vpt_jax import main as vpt_main


def _child(devices: int, log: str, env: dict, argv: list) -> None:
  fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  code = 0
  try:
    os.environ.update(env)
    jax.config.update("jax_num_cpu_devices", devices)
    app.run(vpt_main.main, argv=["vpt_jax.main", *argv], flags_parser=vpt_main.parse_flags)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException as e:  # pylint: disable=broad-except
    print(f"child error: {type(e).__name__}: {e}", file=sys.stderr)
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def main() -> None:
  children = {}
  for line in sys.stdin:
    cmd = json.loads(line)
    if "start" in cmd:
      pid = os.fork()
      if pid == 0:
        _child(cmd["devices"], cmd["log"], cmd["env"], cmd["argv"])
      children[cmd["start"]] = pid
    elif cmd.get("wait"):
      codes = {n: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for n, pid in children.items()}
      children.clear()
      print(json.dumps(codes), flush=True)


if __name__ == "__main__":
  main()
