"""Work claims on a shared workdir, so that independent jobs split one protocol's runs.

Any scheduler (a SLURM job array, a TPU pod's hosts, Ray tasks) starts the same
`python -m vpt_jax.sweep --protocol --claim` command several times; each job claims a run before
starting it by creating `<run workdir>.claim` with O_CREAT | O_EXCL (atomic on local filesystems
and NFSv3+), runs it, and removes the claim. A run with results.json is finished and never
claimed again.

A claim names its holder (host, pid) and its file's mtime is refreshed every `stale_after_s / 4`
by a daemon thread. It is stale, and may be taken over, when its holder is a dead process on this
host, or when it has not been refreshed for `stale_after_s` (a dead or unreachable host). The run
of a crashed job continues from its last checkpoint in the job that takes it over, so a crash
loses at most the steps since that checkpoint, and a run is never done twice: the taker renames
the stale file away (atomic; of several takers one wins), checks that it moved the stale claim it
saw (and puts back a fresh one it moved by mistake), then claims with O_EXCL like anyone else.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any, Dict, Optional

STALE_AFTER_S = 600.0    # a claim not refreshed for this long belongs to a dead or lost host


def _read(path: str) -> Optional[Dict[str, Any]]:
  try:
    with open(path) as f:
      return json.load(f)
  except (FileNotFoundError, json.JSONDecodeError):
    return None  # gone, or being written (a claim is written right after its O_EXCL create)


def _pid_alive(pid: int) -> bool:
  """Whether process `pid` of this host runs (a zombie, exited but not yet reaped, does not)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True  # no /proc (macOS): kill(pid, 0) is all there is


def _staleness(path: str, stale_after_s: float) -> tuple[bool, Optional[str]]:
  """(whether the claim at `path` is stale, the token of the claim judged)."""
  info = _read(path)
  token = (info or {}).get("token")
  try:
    age = time.time() - os.stat(path).st_mtime
  except FileNotFoundError:
    return False, token
  if age > stale_after_s:
    return True, token
  if info is None:
    return False, token  # just created, its content not written yet
  dead = info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))
  return dead, token


def is_stale(path: str, stale_after_s: float = STALE_AFTER_S) -> bool:
  """Whether the claim at `path` belongs to a dead holder (see the module docstring)."""
  return _staleness(path, stale_after_s)[0]


class Claim:
  """A held claim; refreshed in the background until `release()`."""

  def __init__(self, path: str, token: str, stale_after_s: float):
    self.path, self.token = path, token
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, args=(max(stale_after_s / 4, 0.05),),
                                    daemon=True)
    self._thread.start()

  def _beat(self, every: float) -> None:
    while not self._stop.wait(every):
      try:
        os.utime(self.path)
      except FileNotFoundError:
        return

  def release(self) -> None:
    self._stop.set()
    self._thread.join()
    info = _read(self.path)
    if info is not None and info.get("token") == self.token:
      os.remove(self.path)


def _take_over(path: str, stale_token: Optional[str]) -> None:
  """Removes the stale claim at `path` unless another job already replaced it."""
  grave = f"{path}.stale.{uuid.uuid4().hex}"
  try:
    os.rename(path, grave)
  except FileNotFoundError:
    return  # another job took it over first
  info = _read(grave)
  if (info or {}).get("token") != stale_token:
    try:
      os.link(grave, path)  # a fresh claim was moved by mistake: put it back, unless replaced
    except FileExistsError:
      pass
  os.remove(grave)


def try_claim(path: str, stale_after_s: float = STALE_AFTER_S) -> Optional[Claim]:
  """The claim at `path` if this process gets it, None if a live job holds it."""
  stale, token = _staleness(path, stale_after_s)
  if stale:
    _take_over(path, token)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return None
  token = uuid.uuid4().hex
  with os.fdopen(fd, "w") as f:
    json.dump({"token": token, "host": socket.gethostname(), "pid": os.getpid(),
               "claimed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f)
  return Claim(path, token, stale_after_s)


def parse_shard(text: str) -> tuple[int, int]:
  """'i/n' -> (i, n) with 0 <= i < n; errors name the --shard flag."""
  try:
    i, n = (int(x) for x in text.split("/"))
  except ValueError:
    raise ValueError(f"--shard={text!r}: expected i/n, e.g. 0/4") from None
  if not 0 <= i < n:
    raise ValueError(f"--shard={text!r}: need 0 <= i < n")
  return i, n
