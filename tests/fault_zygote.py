"""A process that imports vpt_jax once and then runs training runs in forked children, killing
each with SIGKILL after a given delay (tests/test_faults.py, the fault-injection run).

Reads lines 'RUN <workdir> <config arg> <delay_s>' on stdin ('-1': no kill); answers one line per
run: 'killed <s>' or 'exit <code> <s>'. JAX's backend is first started in each child, so the fork
copies no runtime threads.
"""

import os
import signal
import sys
import time

from configs import demo  # pylint: disable=unused-import; imported before forking
from vpt_jax.tuning import loop


def main() -> None:
  for line in sys.stdin:
    _, workdir, arg, delay = line.split()
    delay = float(delay)
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
      code = 0
      try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        loop.train_and_evaluate(demo.get_config(arg), workdir)
      except BaseException as e:  # pylint: disable=broad-except
        print(f"child error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        code = 1
      os._exit(code)  # pylint: disable=protected-access
    if delay >= 0:
      end = t0 + delay
      while time.time() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
          break
        time.sleep(0.005)
      else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        print(f"killed {time.time() - t0:.3f}", flush=True)
        continue
    else:
      _, status = os.waitpid(pid, 0)
    print(f"exit {os.waitstatus_to_exitcode(status)} {time.time() - t0:.3f}", flush=True)


if __name__ == "__main__":
  main()
