"""Where a run's numbers go: a JSONL file, TensorBoard event files and a progress line."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional, Set, Tuple


def _recorded(path: str) -> Set[Tuple[int, str]]:
  """(step, name) pairs already in a metrics.jsonl; drops a last line cut short by a kill."""
  if not os.path.exists(path):
    return set()
  with open(path, "rb") as f:
    data = f.read()
  if data and not data.endswith(b"\n"):
    with open(path, "r+b") as f:
      f.truncate(data.rfind(b"\n") + 1)
    data = data[:data.rfind(b"\n") + 1]
  seen = set()
  for line in data.decode().splitlines():
    try:
      record = json.loads(line)
    except ValueError:
      continue
    seen.update((int(record["step"]), k) for k in record if k != "step")
  return seen


class MetricWriter:
  """Appends {step, **metrics} records to workdir/metrics.jsonl and TensorBoard's workdir/tb.

  Only process 0 of a multi-host run writes.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      self._seen = _recorded(path)
      self._jsonl = open(path, "a")
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    # A resumed run recomputes the steps after its checkpoint: what a killed run already
    # recorded is not written twice (to the JSONL file or TensorBoard).
    metrics = {k: v for k, v in metrics.items() if (int(step), k) not in self._seen}
    if not metrics:
      return
    self._seen.update((int(step), k) for k in metrics)
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    with self._tb.as_default():
      for k, v in metrics.items():
        self._tf.summary.scalar(k, float(v), step=int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """A one-line status: step, epoch, loss, throughput and ETA."""

  def __init__(self, total_steps: int, steps_per_epoch: int, batch_size: int, start_step: int,
               enabled: bool = True):
    self.total, self.spe, self.batch = total_steps, steps_per_epoch, batch_size
    self.enabled = enabled
    self._t0, self._s0 = time.perf_counter(), start_step

  def restart_clock(self, step: int) -> None:
    """Excludes compilation and evaluation from the throughput estimate."""
    self._t0, self._s0 = time.perf_counter(), step

  def line(self, step: int, metrics: Dict[str, float]) -> Optional[str]:
    if not self.enabled:
      return None
    dt = time.perf_counter() - self._t0
    done = step - self._s0
    rate = done / dt if dt > 0 and done > 0 else 0.0
    eta = (self.total - step) / rate if rate else float("nan")
    eta_s = "?" if eta != eta else time.strftime("%H:%M:%S", time.gmtime(eta))
    epochs = -(-self.total // self.spe)  # a partial last epoch (iteration schedules) counts
    parts = [f"step {step}/{self.total}", f"epoch {(step - 1) // self.spe + 1}/{epochs}"]
    parts += [f"{k} {v:.4g}" for k, v in metrics.items()]
    parts += [f"{rate * self.batch:.1f} img/s", f"ETA {eta_s}"]
    text = " | ".join(parts)
    print(text, flush=True, file=sys.stdout)
    return text
