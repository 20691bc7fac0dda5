"""Faults a long campaign meets (issue 14): each is reproduced and the fixed behaviour asserted.

Processes that must die or could hang run as subprocesses, always under a timeout.
"""

import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

import vpt_jax
from configs import demo
from conftest import ROOT, SMALL_DIGITS, SMALL_TRAIN, optimised_env
import forked_cli
from vpt_jax import serving
from vpt_jax.data import folders, sources
from vpt_jax.tuning import loop, steps
from vpt_jax.tuning import workdir as workdir_lib
from vpt_jax.weights import download, zoo

FAST = ("model.checkpoint=tiny-random,optim.epochs=2,optim.warmup_epochs=0,eval_every_epochs=1,"
        f"log_every_steps=3,{SMALL_DIGITS}")
TIMEOUT_S = 180
# Steps per epoch of these runs: every example each epoch (the last batch partial).
SPE = -(-SMALL_TRAIN // demo.get_config("vpt-deep").batch_size)


def cfg(extra=""):
  return demo.get_config(",".join(x for x in ("vpt-deep", FAST, extra) if x))


def run_cli(workdir, arg, *, wrapper=None, timeout=TIMEOUT_S):
  """`python -m vpt_jax.main` (or `wrapper`, a script that runs it) -> CompletedProcess; a run
  that outlives `timeout` is killed and reported as a hang."""
  entry = [wrapper] if wrapper else ["-m", "vpt_jax.main"]
  cmd = [sys.executable, *entry, f"--config=configs/demo.py:{arg}", f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=ROOT)
  try:
    return forked_cli.run(cmd, cwd=ROOT, env=env, timeout=timeout)
  except subprocess.TimeoutExpired:
    pytest.fail(f"{' '.join(cmd)} hung for {timeout} s")


# A workdir whose checkpoint directories turn read-only once the first checkpoint is complete
# (tests run as root, where chmod does not stop writes, so the refusal is injected at os.mkdir,
# where orbax's background save creates each step's directory).
READ_ONLY_AFTER_FIRST = textwrap.dedent('''
    import errno, os, runpy, sys
    wd = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
    root = os.path.join(os.path.abspath(wd), "checkpoints")
    last = os.path.join(root, "last")
    _mkdir = os.mkdir
    def mkdir(path, *a, **k):
      p = os.path.abspath(os.fspath(path))
      if p.startswith(root + os.sep) and os.path.isdir(last) and any(
          s.isdigit() for s in os.listdir(last)):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), p)
      return _mkdir(path, *a, **k)
    os.mkdir = mkdir
    sys.argv = ["vpt_jax.main"] + sys.argv[1:]
    runpy.run_module("vpt_jax.main", run_name="__main__")
''')


def test_a_failed_checkpoint_save_ends_the_run_naming_the_workdir(tmp_path):
  wrapper = tmp_path / "read_only.py"
  wrapper.write_text(READ_ONLY_AFTER_FIRST)
  wd = str(tmp_path / "run")
  r = run_cli(wd, f"vpt-deep,{FAST}", wrapper=str(wrapper), timeout=120)
  assert r.returncode != 0
  # One error line (orbax's background threads may report the same failure before it: in
  # which order the two are written depends on thread timing, so the line is found, not taken
  # to be the last).
  errors = [l for l in r.stderr.splitlines() if l.startswith("vpt_jax.main: error:")]
  assert len(errors) == 1, r.stderr[-3000:]
  last_line = errors[0]
  assert "cannot write a checkpoint in" in last_line and wd in last_line, last_line
  assert "Permission denied" in last_line, last_line
  # The message names the last complete checkpoint: the first one, or, when the refused directory
  # was created while that save was still finishing (saves are asynchronous), the next.
  named = int(re.search(r"last complete checkpoint \(step (\d+)\)", last_line)[1])
  assert named % SPE == 0 and _saved_steps(wd)[-1] == named, (named, _saved_steps(wd))
  # The last complete checkpoint is intact and loads.
  model, variables = workdir_lib.load_tuned(wd, which="last")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
  assert not os.path.exists(os.path.join(wd, "results.json"))


def _saved_steps(workdir, which="last"):
  d = os.path.join(workdir, "checkpoints", which)
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _drop_checkpoints(workdir, which, drop):
  """Deletes the saved steps of `which` (last/best) for which `drop(step)` holds."""
  for step in _saved_steps(workdir, which):
    if drop(step):
      shutil.rmtree(os.path.join(workdir, "checkpoints", which, str(step)))


def test_nan_stop_never_saves_a_non_finite_state(tmp_path, monkeypatch):
  # The update of step 3 turns the prompts into NaN while its loss (computed before the update)
  # and grad norm stay finite: the old check saved that state and named it the last good one.
  real = steps.make_train_step

  def poisoned(model, tx, schedule, **kw):
    step_fn = real(model, tx, schedule, **kw)

    def wrapped(state, frozen, batch):
      new, metrics = step_fn(state, frozen, batch)
      bad = new.step >= 3
      return new.replace(trainable=jax.tree.map(lambda x: jnp.where(bad, jnp.nan, x),
                                                new.trainable)), metrics
    return wrapped

  monkeypatch.setattr(steps, "make_train_step", poisoned)
  wd = str(tmp_path / "run")
  with pytest.raises(FloatingPointError) as e:
    loop.train_and_evaluate(cfg("checkpoint_every_steps=1"), wd)
  msg = str(e.value)
  assert "at step 3" in msg and "not finite" in msg and "lower optim.lr" in msg, msg
  assert _saved_steps(wd) == [1, 2]
  assert f"last good checkpoint (step 2) is in {wd}/checkpoints/last (checked finite)" in msg
  tuned = workdir_lib.load_tuned(wd, which="last")
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tuned.variables))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: (workdir, results, final trainable leaves)."""
  wd = str(tmp_path_factory.mktemp("reference") / "run")
  results = loop.train_and_evaluate(cfg(), wd)
  return wd, results, _final_leaves(wd)


def _final_leaves(wd):
  tuned = workdir_lib.load_tuned(wd, which="last")
  return [np.asarray(x) for x in jax.tree.leaves(tuned.split()[0])]


def _comparable(results):
  return {k: v for k, v in results.items() if k != "wall_time_s"}


def _metric_keys(wd):
  keys = [(r["step"], k) for r in map(json.loads, open(os.path.join(wd, "metrics.jsonl")))
          for k in r if k != "step"]
  return keys


def test_resume_from_any_consistent_subset_keeps_every_result(tmp_path, reference):
  ref_wd, ref_results, ref_leaves = reference
  assert ref_results["best_val_top1"] is not None
  best_step = _saved_steps(ref_wd, "best")[0]
  for case in ("results lost", "last lacks best's step", "killed between last and best saves"):
    wd = str(tmp_path / case.replace(" ", "_").replace("'", ""))
    shutil.copytree(ref_wd, wd)
    os.remove(os.path.join(wd, "results.json"))
    if case == "last lacks best's step":
      _drop_checkpoints(wd, "last", lambda step: step >= best_step)
    if case == "killed between last and best saves":
      # last/ saved the validated best step, best/ did not: nothing after it was written. The
      # resumed run starts at that step and never validates it again.
      assert best_step in _saved_steps(wd)
      _drop_checkpoints(wd, "last", lambda step: step > best_step)
      _drop_checkpoints(wd, "best", lambda step: step == best_step)
    results = loop.train_and_evaluate(cfg(), wd)
    assert _comparable(results) == _comparable(ref_results), case
    with open(os.path.join(wd, "results.json")) as f:
      assert json.load(f)["best_val_top1"] == ref_results["best_val_top1"], case
    for a, b in zip(_final_leaves(wd), ref_leaves):
      np.testing.assert_array_equal(a, b)
    assert _saved_steps(wd, "best") == [best_step], case
    best, ref_best = (workdir_lib.load_tuned(w, which="best") for w in (wd, ref_wd))
    for a, b in zip(jax.tree.leaves(best.split()[0]), jax.tree.leaves(ref_best.split()[0])):
      np.testing.assert_array_equal(a, b)
    keys = _metric_keys(wd)
    assert len(keys) == len(set(keys)), f"{case}: metrics.jsonl repeats steps"
    assert sorted(keys) == sorted(_metric_keys(ref_wd)), case


def _hold_lock(workdir: str) -> int:
  """A forked child that takes the workdir's lock as a run does and then sleeps; returns its pid
  once it holds the lock. (Forked: a fresh interpreter would spend seconds importing; the child
  runs only os/fcntl code and never touches JAX.)"""
  r, w = os.pipe()
  with warnings.catch_warnings():  # JAX warns of any fork: this child never calls into JAX
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    pid = os.fork()
  if pid == 0:  # the holder
    try:
      os.close(r)
      workdir_lib.WorkdirLock(workdir)
      os.write(w, b"locked")
      time.sleep(120)
    finally:
      os._exit(0)  # pylint: disable=protected-access
  os.close(w)
  with os.fdopen(r, "rb") as f:
    assert f.read(6) == b"locked"
  return pid


def test_a_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  wd = str(tmp_path / "run")
  holder = _hold_lock(wd)
  try:
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by .*\"pid\": {holder}"):
      loop.train_and_evaluate(cfg(), wd)
    assert not os.path.exists(os.path.join(wd, "metrics.jsonl"))
  finally:
    os.kill(holder, signal.SIGKILL)  # its lock file stays behind, stale
    os.waitpid(holder, 0)
  assert str(holder) in open(os.path.join(wd, workdir_lib.LOCK_FILE)).read()
  results = loop.train_and_evaluate(cfg("optim.epochs=1"), wd)  # the stale lock does not block
  assert results["steps"] == SPE
  workdir_lib.WorkdirLock(wd).release()  # released on exit


def test_resume_with_other_optimizer_settings_is_refused_unless_allowed(tmp_path, reference):
  ref_wd, ref_results, _ = reference
  wd = str(tmp_path / "run")
  shutil.copytree(ref_wd, wd)
  shutil.rmtree(os.path.join(wd, "checkpoints", "last", str(_saved_steps(wd)[-1])))
  with pytest.raises(workdir_lib.FingerprintMismatch,
                     match=r"optim.lr: 0.5 in the checkpoint, 0.25 now(.|\n)*resume_with_changes"):
    loop.train_and_evaluate(cfg("optim.lr=0.25"), wd)
  results = loop.train_and_evaluate(cfg("optim.lr=0.25,optim.resume_with_changes=True"), wd)
  assert results["steps"] == ref_results["steps"]


# --- Downloads: a local server that misbehaves ------------------------------------------------

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


class _Handler(http.server.BaseHTTPRequestHandler):
  mode = "ok"

  def do_GET(self):  # pylint: disable=invalid-name
    self.send_response(200)
    self.send_header("Content-Length", str(len(PAYLOAD)))
    self.end_headers()
    if self.mode == "truncate":
      self.wfile.write(PAYLOAD[:len(PAYLOAD) // 2])
      self.wfile.flush()
      self.close_connection = True
    elif self.mode == "stall":
      self.wfile.write(PAYLOAD[:100])
      self.wfile.flush()
      time.sleep(8)
    else:
      self.wfile.write(PAYLOAD)

  def log_message(self, *args):
    pass


@pytest.fixture
def server():
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.daemon_threads = True
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield httpd
  httpd.shutdown()


def _url(httpd, name):
  return f"http://127.0.0.1:{httpd.server_address[1]}/{name}"


def test_a_truncated_download_is_never_cached(tmp_path, server, monkeypatch):
  monkeypatch.setattr(_Handler, "mode", "truncate")
  cache = str(tmp_path / "cache")
  with pytest.raises(download.CheckpointError, match="8192 of the 16384 bytes"):
    download.download(_url(server, "w.npz"), cache)
  assert os.listdir(cache) == []
  monkeypatch.setattr(_Handler, "mode", "ok")
  path = download.download(_url(server, "w.npz"), cache)
  assert open(path, "rb").read() == PAYLOAD


def test_a_stalled_download_times_out(tmp_path, server, monkeypatch):
  monkeypatch.setattr(_Handler, "mode", "stall")
  monkeypatch.setattr(download, "TIMEOUT_S", 1.0)
  t0 = time.time()
  with pytest.raises(download.CheckpointError, match="timed out"):
    download.download(_url(server, "s.npz"), str(tmp_path / "cache"))
  assert time.time() - t0 < 6


def test_sha256_pinning_and_cache_errors(tmp_path, server):
  good = hashlib.sha256(PAYLOAD).hexdigest()
  cache = str(tmp_path / "cache")
  with pytest.raises(download.CheckpointError, match="does not match the expected 0000"):
    download.resolve(_url(server, "p.npz") + "@sha256:" + "0" * 64, cache)
  assert os.listdir(cache) == []
  path, subtree = download.resolve(_url(server, "p.npz") + f"@sha256:{good}:img", cache)
  assert subtree == "img" and open(path, "rb").read() == PAYLOAD
  # A stale .partial of a dead process is deleted by the next download.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, timeout=60).stdout.strip()
  stale = os.path.join(cache, f"x_q.npz.{dead}.partial")
  open(stale, "wb").close()
  download.download(_url(server, "q.npz"), cache)
  assert not os.path.exists(stale)
  # A cache directory that cannot be written names VPT_JAX_CACHE.
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(download.CheckpointError, match="VPT_JAX_CACHE"):
    download.download(_url(server, "r.npz"), str(blocker / "cache"))


def test_a_zoo_entrys_published_hash_prefix_is_enforced(tmp_path, server, monkeypatch):
  """torchvision names its files by their sha256's first 8 hex digits: a zoo entry holding such a
  prefix accepts only a download that starts with it."""
  from vpt_jax.weights import zoo
  good = hashlib.sha256(PAYLOAD).hexdigest()
  for name, prefix in (("bad-entry", "0" * 8), ("good-entry", good[:8])):
    monkeypatch.setitem(zoo.ZOO, name, zoo.Entry(_url(server, f"{name}.pth"), "test", "resnet",
                                                 sha256_prefix=prefix))
  assert zoo.sha256_for("good-entry") == good[:8]
  with pytest.raises(download.CheckpointError, match="does not match the expected 00000000"):
    download.resolve("bad-entry", str(tmp_path / "cache"))
  path, _ = download.resolve("good-entry", str(tmp_path / "cache"))
  assert open(path, "rb").read() == PAYLOAD


def test_a_zoo_entrys_size_and_md5_prefix_are_enforced(tmp_path, server, monkeypatch):
  """The MAE and MoCo READMEs publish md5 prefixes, and some sizes are known: a download that
  differs in either is refused and not cached; one that matches is kept."""
  from vpt_jax.weights import zoo
  md5 = hashlib.md5(PAYLOAD).hexdigest()
  cases = {"bad-md5": dict(md5_prefix="ffffff" if md5[:6] != "ffffff" else "000000"),
           "bad-size": dict(size=len(PAYLOAD) + 1),
           "good-both": dict(md5_prefix=md5[:6], size=len(PAYLOAD))}
  for name, kw in cases.items():
    monkeypatch.setitem(zoo.ZOO, name, zoo.Entry(_url(server, f"{name}.pth"), "test", "mae", **kw))
  cache = tmp_path / "cache"
  with pytest.raises(download.CheckpointError, match=f"md5 {md5} does not match"):
    download.resolve("bad-md5", str(cache))
  with pytest.raises(download.CheckpointError, match=f"size {len(PAYLOAD)} bytes does not match"):
    download.resolve("bad-size", str(cache))
  assert not [f for f in os.listdir(cache) if "bad" in f]
  path, _ = download.resolve("good-both", str(cache))
  assert open(path, "rb").read() == PAYLOAD


# --- Corrupt images with a valid header -----------------------------------------------------


def _jpeg(rng):
  return tf.io.encode_jpeg(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).numpy()


def test_corrupt_jpegs_are_named_when_a_folder_is_opened_and_skip_skips_them(tmp_path):
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    (tmp_path / cls).mkdir()
    for i in range(4):
      (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg(rng))
  good = _jpeg(rng)
  (tmp_path / "a" / "random_body.jpg").write_bytes(good[:4] + rng.bytes(len(good) - 4))
  (tmp_path / "b" / "truncated.jpg").write_bytes(good[:len(good) // 2])
  with pytest.raises(ValueError, match=r"a/random_body.jpg: image listed in .* does not decode"):
    folders.read_class_folders(str(tmp_path), "train", val_fraction=0.0)
  with pytest.warns(UserWarning, match=r"skipped 2 unreadable.*random_body.jpg.*truncated.jpg"):
    split = folders.read_class_folders(str(tmp_path), "train", val_fraction=0.0,
                                       on_bad_image="skip")
  assert len(split) == 8
  for image in split.images:  # what remains decodes as the pipeline decodes it
    tf.io.decode_image(image, channels=3, expand_animations=False)


# --- The fault-injection run ------------------------------------------------------------------

# Stratified: the run's duration is cut into KILLS equal slices and one kill lands at a seeded-
# random moment of each, so every phase (start-up, steps, the evaluation, the saves of last/ and
# best/) is hit with half the kills that independent random moments needed for the same cover
# (20, each a forked run of its own, before issue 20). VPT_JAX_FAULT_KILLS=40 for a longer soak.
KILLS = int(os.environ.get("VPT_JAX_FAULT_KILLS", 10))


def kill_moments(duration: float, kills: int, rng: np.random.Generator) -> np.ndarray:
  """One seeded-random moment in each of `kills` equal slices of [0, duration), earliest first: a
  run killed before its one checkpoint resumes from the start and runs whole again, so the next,
  later moment still lands; only kills after the checkpoint leave a shorter resumed run."""
  return (np.arange(kills) + rng.uniform(size=kills)) * duration / kills


def test_kill_moments_cover_every_slice_of_the_run():
  moments = kill_moments(3.0, 10, np.random.default_rng(14))
  assert len(moments) == 10 and list(np.floor(moments / 0.3).astype(int)) == list(range(10))


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
  """SIGKILL at KILLS seeded-random moments, one in each KILLS-th of an uninterrupted run's
  duration (startup, steps, the saves of last/ and best/), resuming each time. A chain of kills
  and resumes goes on until a resumed run completes; its end state and results.json must match
  the uninterrupted run's bit for bit (apart from wall time); then a new chain starts in a fresh
  workdir until KILLS kills have landed."""
  # One epoch (SPE steps, an evaluation, saves of last/ and best/): every phase a kill can hit.
  arg = f"vpt-deep,{FAST},optim.epochs=1"
  zygote = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "fault_zygote.py")],
                            cwd=ROOT, env=optimised_env(dict(os.environ, PYTHONPATH=ROOT)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 60 * 10

  def run(wd, delay):
    zygote.stdin.write(f"RUN {wd} {arg} {delay}\n")
    zygote.stdin.flush()
    line = zygote.stdout.readline().split()
    assert line and time.time() < deadline, "the fault-injection run hung"
    assert line[0] == "killed" or line[:2] == ["exit", "0"], line
    return line[0], float(line[-1])

  def check_same(wd, ref):
    for a, b in zip(_final_leaves(wd), _final_leaves(ref)):
      np.testing.assert_array_equal(a, b)
    results = [_comparable(json.load(open(os.path.join(d, "results.json")))) for d in (wd, ref)]
    assert results[0] == results[1]
    keys = _metric_keys(wd)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(_metric_keys(ref))

  try:
    ref = str(tmp_path / "reference")
    run(ref, -1)
    # Kill moments are drawn over a run with the compilation cache warm: the first run's duration
    # includes compiling (this test may run first on a clean clone), and most kills drawn over it
    # would land after a resumed run has finished. The second run also shows two uninterrupted
    # runs end bit-identical.
    warm = str(tmp_path / "warm")
    _, duration = run(warm, -1)
    check_same(warm, ref)
    # A resumed run that completes before its moment ends its chain (compared with the
    # reference); the moment is then tried on the fresh run of the next chain, so every slice
    # gets a kill that lands. Kills and misses are counted in the assertion message below.
    moments = list(kill_moments(duration, KILLS, np.random.default_rng(14)))
    spare = np.random.default_rng(15)
    kills = chains = 0
    wd, runs_in_chain = str(tmp_path / "chain0"), 0
    while kills < KILLS:
      moment = moments.pop(0) if moments else spare.uniform(0.0, duration)
      status, _ = run(wd, f"{moment:.3f}")
      runs_in_chain += 1
      if status == "killed":
        kills += 1
        continue
      check_same(wd, ref)
      if runs_in_chain > 1:
        moments.insert(0, moment)
      chains += 1
      wd, runs_in_chain = str(tmp_path / f"chain{chains}"), 0
    if runs_in_chain:
      run(wd, -1)
      check_same(wd, ref)
  finally:
    zygote.stdin.close()
    zygote.kill()
    zygote.wait(timeout=30)
  assert kills == KILLS, (kills, chains)


# --- Clear errors -------------------------------------------------------------------------------


def test_multitask_server_refuses_out_of_range_task_ids():
  base, variables = vpt_jax.load_pretrained("tiny-random")
  tasks = [serving.task_from_model(f"t{i}", base.clone(num_classes=10), variables)
           for i in range(2)]
  server = serving.MultiTaskServer.from_tasks(base, variables["params"], tasks)
  images = jnp.zeros((2, 32, 32, 3), jnp.float32)
  assert np.isfinite(np.asarray(server(images, [0, 1]))).all()
  for ids in ([0, 2], [-1, 0]):
    with pytest.raises(ValueError, match=rf"task id\(s\) \[{max(ids) if max(ids) > 1 else -1}\] "
                                         r"out of range: this server has 2 tasks"):
      server(images, ids)


def _tiny_arrays():
  with np.load(zoo.url_for("tiny-random")) as f:
    return {k: f[k] for k in f.files}


def test_non_finite_backbone_weights_are_refused_naming_the_key(write_npz):
  arrays = _tiny_arrays()
  key = next(k for k in arrays if re.search(r"MlpBlock_\d/Dense_1/kernel$", k))
  arrays[key] = arrays[key].copy()
  arrays[key][3, 5] = np.nan
  with pytest.raises(vpt_jax.CheckpointError, match=rf"key '{key}' holds 1 NaN/Inf value"):
    vpt_jax.load_pretrained(write_npz(arrays))


def test_a_wrong_shape_mlp_kernel_is_blamed_not_its_intact_bias(write_npz):
  arrays = _tiny_arrays()
  key = next(k for k in arrays if re.search(r"encoderblock_0/MlpBlock_\d/Dense_0/kernel$", k))
  arrays[key] = np.zeros((arrays[key].shape[0], arrays[key].shape[1] + 3), np.float32)
  with pytest.raises(vpt_jax.CheckpointError, match=rf"key '{key}' has shape"):
    vpt_jax.load_pretrained(write_npz(arrays))


def test_one_line_messages_name_what_is_wrong(tmp_path):
  text = tmp_path / "weights.npz"
  text.write_text("<html>404 not found</html>")
  with pytest.raises(vpt_jax.CheckpointError, match="not a readable .npz archive .starts") as e:
    vpt_jax.load_pretrained(str(text))
  assert "allow_pickle" not in str(e.value)
  # A zoo name with a sub-tree resolves the zoo file (and then names the missing sub-tree).
  with pytest.raises(vpt_jax.CheckpointError, match=r"demo_vit.npz: no sub-tree 'img'"):
    vpt_jax.load_pretrained("demo-vit:img")
  c = cfg("data.source=folder")
  with pytest.raises(ValueError, match=r"data.root must name the dataset folder"):
    sources.num_classes(c.data)
  with pytest.raises(ValueError, match=r"option 'optim.lr' takes a float like 0.5, not 'abc'"):
    cfg("optim.lr=abc")
  # An empty class folder is reported, not silently a class without examples.
  rng = np.random.default_rng(0)
  for cls in ("a", "b", "empty"):
    (tmp_path / "imgs" / cls).mkdir(parents=True)
  for cls in ("a", "b"):
    (tmp_path / "imgs" / cls / "0.jpg").write_bytes(_jpeg(rng))
  with pytest.warns(UserWarning, match=r"class folder 'empty' \(label 2\) holds no"):
    folders.read_class_folders(str(tmp_path / "imgs"), "train", val_fraction=0.0)


def test_an_unknown_config_flag_is_one_line_not_a_traceback(tmp_path):
  r = forked_cli.run([sys.executable, "-m", "vpt_jax.main", "--config=configs/demo.py:vpt-deep",
                      f"--workdir={tmp_path}", "--config.optim.lrr=0.1"], cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT), timeout=TIMEOUT_S)
  assert r.returncode == 2
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert ("error: unknown config option 'lrr' (Did you mean \"lr\" instead of \"lrr\"?) "
          "(flags: --config.optim.lrr") in r.stderr
  assert not os.listdir(tmp_path)  # refused before the workdir is touched
