"""A run's workdir: orbax checkpoints of what trains (never the frozen backbone), its config,
and `load_tuned`.

Layout of a workdir:

    config.json              the resolved config of the run
    checkpoints/last/<step>/ the last `keep_checkpoints` states (trainable tree, optimizer, step,
                             RNG)
    checkpoints/best/<step>/ the state with the best validation top-1
    each with meta/ holding the run's fingerprint (`build.Built.fingerprint`)

A checkpoint restores only onto the backbone and model it was made with: anything else is refused
with the list of what differs. A prompt checkpoint plus the public backbone is a complete model:
`load_tuned(workdir)` rebuilds it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import time
from typing import Any, Callable, Dict, Iterator, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vpt_jax import prompts
from vpt_jax.data import sources
from vpt_jax.models import heads
from vpt_jax.tuning import build, optim, pruning, rules, steps

CONFIG_FILE = "config.json"
LOCK_FILE = "lock"


class FingerprintMismatch(ValueError):
  """A checkpoint was made on another backbone or model than the one it is restored onto."""


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """An exclusive lock on a workdir, so two runs never interleave their saves and metrics.

  A `flock` on workdir/lock: the kernel releases it when the holder exits or is killed, so a stale
  lock file of a dead process never blocks a later run. The file names the holder (pid, host,
  start time) for the refusal message. Local and NFSv4 filesystems only (no-op elsewhere).
  """

  def __init__(self, workdir: str):
    self._created = not os.path.exists(workdir)
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    self._fd: Optional[int] = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(self._fd, 4096, 0).decode(errors="replace").strip() or "another process"
      os.close(self._fd)
      self._fd = None
      raise WorkdirBusy(f"workdir {workdir} is in use by {holder} (lock {self.path}): wait for "
                        f"that run to end, or use another --workdir") from e
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime())}).encode(), 0)

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
      workdir = os.path.dirname(self.path)
      if self._created and os.listdir(workdir) == [LOCK_FILE]:
        os.remove(self.path)  # a run refused before any work leaves no workdir behind
        os.rmdir(workdir)


class SaveFailed(RuntimeError):
  """A checkpoint could not be written (read-only workdir, full disk): the run must end.

  Orbax's background threads of a failed async save never finish, so a command that meets this
  error exits with `os._exit` (`vpt_jax.main`) rather than waiting for them.
  """


def _state_tree(state: steps.TrainState) -> Dict[str, Any]:
  tree = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state,
          "rng": state.rng}
  if getattr(state, "batch_stats", None) is not None:  # segmentation heads' BatchNorm statistics
    tree["batch_stats"] = state.batch_stats
  return tree


class Checkpointer:
  """The 'last' and 'best' orbax managers of a workdir, checked against a fingerprint."""

  def __init__(self, workdir: str, fingerprint: Dict[str, Any], keep: int = 3,
               optim: Optional[Dict[str, Any]] = None):
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    self.fingerprint = fingerprint
    # The optimizer settings a resume must match (None: not checked, e.g. `load_tuned`).
    self.optim = None if optim is None else json.loads(json.dumps(optim))
    self.failed: Optional[BaseException] = None  # the error of a failed save
    self.last = ocp.CheckpointManager(
        os.path.join(root, "last"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        os.path.join(root, "best"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             best_fn=lambda m: m["val_top1"], best_mode="max"))

  def _args(self, state: steps.TrainState, val_top1: Optional[float] = None):
    meta = {"fingerprint": self.fingerprint, "optim": self.optim}
    if val_top1 is not None:  # this step's validation, for `complete_best` after a kill
      meta["val_top1"] = float(val_top1)
    return ocp.args.Composite(state=ocp.args.StandardSave(_state_tree(state)),
                              meta=ocp.args.JsonSave(meta))

  def _fail(self, e: BaseException) -> SaveFailed:
    self.failed = e
    last = None
    if not isinstance(e, SaveFailed):
      # Read from the directory: the manager's cached list also holds the step whose
      # asynchronous save has just failed.
      last = max(self.last.all_steps(read=True), default=None)
    where = os.path.dirname(str(self.last.directory))
    return SaveFailed(
        f"cannot write a checkpoint in {where} "
        f"({type(e).__name__}: {e}); stopping. "
        + (f"The last complete checkpoint (step {last}) is intact in {where}/last. "
           if last is not None else "No complete checkpoint was written. ")
        + "Free disk space or make the workdir writable, then rerun the same command to resume.")

  def save(self, state: steps.TrainState, val_top1: Optional[float] = None) -> None:
    step = int(state.step)
    try:
      # A killed run may have completed this step in one manager and not the other; its state
      # is the one this run recomputed (the run is deterministic), so it is kept, not rewritten.
      if step not in self.last.all_steps():
        self.last.save(step, args=self._args(state, val_top1), force=True)
      if jax.process_count() > 1:
        # Several processes: one manager's async save at a time. Two in flight at once (last and
        # best at the same step) can pair one manager's cross-process barrier with the other's,
        # and orbax then finalizes before every process has written (seen with 2 CPU processes).
        self.last.wait_until_finished()
      if val_top1 is not None and step not in self.best.all_steps():
        self.best.save(step, args=self._args(state, val_top1),
                       metrics={"val_top1": float(val_top1)}, force=True)
      if jax.process_count() > 1:
        self.best.wait_until_finished()
      self.last.check_for_errors()
      self.best.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except; any failure of a save ends the run.
      raise self._fail(e) from e

  def complete_best(self, state: steps.TrainState) -> None:
    """Offers `state` (just restored from last/) to best/ if a kill came between the two saves.

    A run killed after last/ had saved a validated step and before best/ had, resumes at that
    step and never validates it again: without this, best/ (and results' best_val_top1) would
    lack a checkpoint the uninterrupted run has. The step's validation top-1 is in last/'s
    metadata; best/ keeps it or drops it by the same rule as during the run.
    """
    step = int(state.step)
    if step not in self.last.all_steps() or step in self.best.all_steps():
      return
    meta = self.last.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get("val_top1") is not None:
      self.save(state, meta["val_top1"])
      self.best.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    return self.last.latest_step()

  def best_val_top1(self) -> Optional[float]:
    """The validation top-1 of the best checkpoint (a resumed run's best so far), if any."""
    step = self.best.best_step()
    metrics = self.best.metrics(step) if step is not None else None
    return None if not metrics or metrics.get("val_top1") is None else float(metrics["val_top1"])

  def restore(self, abstract_state: steps.TrainState, *, which: str = "last",
              step: Optional[int] = None) -> Optional[steps.TrainState]:
    """The saved state (on the shardings of `abstract_state`), or None if there is none."""
    mngr = self.last if which == "last" else self.best
    step = step if step is not None else (
        mngr.latest_step() if which == "last" else mngr.best_step())
    if step is None:
      return None
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    check_fingerprint(meta["fingerprint"], self.fingerprint, where=f"{mngr.directory}/{step}")
    check_optim(meta.get("optim"), self.optim, where=f"{mngr.directory}/{step}")
    # Restore onto the shardings of the abstract state (or replicated over this process's devices),
    # never onto the saved ones: a run may resume on another number of devices.
    replicated, _ = steps.mesh_shardings()
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=getattr(x, "sharding", None) or replicated),
        _state_tree(abstract_state))
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target))).state
    return type(abstract_state)(**restored)

  def wait(self) -> None:
    try:
      self.last.wait_until_finished()
      self.best.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._fail(e) from e

  def close(self) -> None:
    if self.failed is not None:
      return  # closing waits on the failed save's threads, which never finish
    self.last.close()
    self.best.close()


def check_fingerprint(saved: Dict[str, Any], current: Dict[str, Any], *, where: str) -> None:
  """Raises `FingerprintMismatch` listing what differs (old-format fingerprints are compared in
  their own terms, `build.comparable`)."""
  saved, current = build.comparable(saved, current)
  if saved != current:
    diff = build.describe_difference(saved, current)
    raise FingerprintMismatch(
        f"checkpoint {where} was made on a different backbone or model and cannot be restored "
        f"onto this one:\n  " + "\n  ".join(diff[:10])
        + ("\n  ..." if len(diff) > 10 else "")
        + "\nUse a fresh workdir, or the backbone and model options the checkpoint was made with.")


def check_optim(saved: Optional[Dict[str, Any]], current: Optional[Dict[str, Any]], *,
                where: str) -> None:
  """Refuses to resume with other optimizer settings (the schedule and momentum would silently
  change mid-run) unless the current config sets optim.resume_with_changes."""
  if saved is None or current is None or current.get("resume_with_changes"):
    return
  diff = [f"optim.{k}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
          for k in sorted(set(saved) | set(current))
          if k != "resume_with_changes" and saved.get(k) != current.get(k)]
  if diff:
    raise FingerprintMismatch(
        f"checkpoint {where} was trained with other optimizer settings:\n  " + "\n  ".join(diff)
        + "\nResume with the saved settings, use a fresh workdir, or set "
          "--config.optim.resume_with_changes=True to continue with the new ones.")


def resume(ckpt: Checkpointer, state: Any, sharding: Any, workdir: str,
           config: ml_collections.ConfigDict, say: Callable[[str], None]) -> Any:
  """The run's state: restored from the workdir's last checkpoint when there is one (placed with
  `sharding`), else `state`; the config is (re)written by process 0 either way."""
  restored = ckpt.restore(state)
  if restored is not None:
    state = jax.device_put(restored, sharding)
    say(f"resuming from {workdir}/checkpoints/last at step {int(state.step)}")
  if jax.process_index() == 0:
    write_config(workdir, config)
  return state


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a vpt_jax workdir (run vpt_jax.main first)")
  with open(path) as f:
    return ml_collections.ConfigDict(with_new_defaults(json.load(f)))


def with_new_defaults(saved: Dict[str, Any]) -> Dict[str, Any]:
  """A saved config with the options added since it was written, at their defaults.

  Their defaults reproduce the behaviour of the version that wrote the config (no masks, no
  modules, same prompt-init seed), so a workdir of an older vpt_jax still loads.
  """
  sections = {"prompt": prompts.default_config(), "prune": pruning.default_config(),
              "modules": heads.default_config(), "data": sources.default_config(),
              "optim": optim.default_optim_config()}
  out = dict(saved)
  for name, default in sections.items():
    out[name] = {**default.to_dict(), **out.get(name, {})}
  out["model"] = {"fast_path": True, **out.get("model", {})}
  out.setdefault("cache_features", "auto")
  return out


@dataclasses.dataclass
class Tuned:
  """Everything a consumer of a tuned run needs (prune, plots, predict, serving).

  Unpacks as `model, variables = load_tuned(workdir)`, the form older code used.
  """

  model: Any
  variables: Dict[str, Any]
  config: ml_collections.ConfigDict
  mask: Any                      # the trainable rule's bool tree over `variables`
  backbone_sha256: str
  checkpoint: str = "last"       # which checkpoint was restored: 'last' or 'best'
  step: int = -1                 # its training step

  def describe(self) -> str:
    """Names the restored checkpoint, for output next to predictions."""
    what = ("the last epoch's, whose numbers results.json reports" if self.checkpoint == "last"
            else "the best on validation, not the one results.json reports")
    return f"{self.checkpoint} checkpoint (step {self.step}; {what})"

  def __iter__(self) -> Iterator[Any]:
    return iter((self.model, self.variables))

  def split(self):
    """(trainable, frozen) trees of the variables."""
    return rules.split(self.variables, self.mask)

  def preprocess(self, *, train: bool = False) -> Callable:
    """The run's preprocessing (`vpt_jax.data.pipeline.make_preprocess`) at the model's size."""
    # pylint: disable-next=g-import-not-at-top; the pipeline imports TensorFlow (heavy), which
    # loading a run does not otherwise need.
    from vpt_jax.data import pipeline
    return pipeline.make_preprocess(self.config.data, self.model.image_size[0], train=train)

  def read_image(self, path: str):
    """An image file as the run's evaluation preprocessing makes it (resize or resize + central
    crop, its normalisation): what `predict` and serving feed the tuned model."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top; heavy, only for file input
    if not os.path.exists(path):
      raise FileNotFoundError(f"image file {path!r} not found")
    with open(path, "rb") as f:
      data = f.read()
    try:
      out = self.preprocess(train=False)(tf.constant(data), tf.zeros(2, tf.int64))
    except tf.errors.InvalidArgumentError as e:
      raise ValueError(f"cannot read {path!r} as an image ({e.message})") from e
    return np.asarray(out)


def load_tuned(workdir: str, *, which: str = "last") -> Tuned:
  """A tuned run: its public backbone plus its saved trainable leaves (`Tuned`).

  which: 'last' (default: the final state, the one whose numbers results.json and the paper
  report) or 'best' (best validation top-1; falls back to 'last' if the run had no validation).
  `model.apply(variables, images)` then predicts like the trained model.
  """
  if which not in ("best", "last"):
    raise ValueError(f"which={which!r}: 'best' or 'last'")
  config = read_config(workdir)
  built = build.build(config)
  trainable, frozen = rules.split(built.variables, built.mask)
  tx, _ = optim.make_optimizer(config.optim, steps_per_epoch=1)
  abstract = jax.eval_shape(lambda t: steps.create_train_state(t, tx, jax.random.PRNGKey(0)),
                            trainable)
  ckpt = Checkpointer(workdir, built.fingerprint())
  try:
    state = ckpt.restore(abstract, which=which)
    if state is None and which == "best":
      which, state = "last", ckpt.restore(abstract, which="last")
  finally:
    ckpt.close()
  if state is None:
    raise FileNotFoundError(f"{workdir}: no checkpoint saved yet")
  return Tuned(built.model, rules.merge(state.trainable, frozen), config, built.mask,
               built.backbone_sha256, checkpoint=which, step=int(state.step))
