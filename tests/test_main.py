"""The training system end to end: demo config, resume after kill -9, refusals.

(8 devices against one: test_multiprocess, which starts the 8-device process anyway.)
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import demo
from conftest import ROOT, SMALL_DIGITS, SMALL_TRAIN
import forked_cli
from vpt_jax.data import pipeline, sources
from vpt_jax.tuning import loop, rules, sweeps
from vpt_jax.tuning import workdir as workdir_lib

# Small, fast settings on the shipped random tiny ViT (the real demo uses `demo-vit`).
FAST = "model.checkpoint=tiny-random,optim.epochs=2,optim.warmup_epochs=0,eval_every_epochs=1," \
       f"log_every_steps=3,{SMALL_DIGITS}"
SPE = -(-SMALL_TRAIN // demo.get_config().batch_size)  # steps per epoch (last batch partial)


def cfg(arm="vpt-deep", extra=""):
  return demo.get_config(",".join(x for x in (arm, FAST, extra) if x))


def cli(workdir, arg, *, env=None, popen=False):
  cmd = [sys.executable, "-m", "vpt_jax.main", f"--config=configs/demo.py:{arg}",
         f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
  if popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
  return forked_cli.run(cmd, cwd=ROOT, env=env, timeout=600)


def final_trainable(workdir):
  model, variables = workdir_lib.load_tuned(str(workdir), which="last")
  config = workdir_lib.read_config(str(workdir))
  mask = rules.label(variables, rules.protocol_patterns(config.protocol))
  return rules.split(variables, mask)[0]


def test_demo_config_end_to_end(tmp_path, capsys):
  wd = str(tmp_path / "run")
  results = loop.train_and_evaluate(cfg(), wd)
  out = capsys.readouterr().out
  assert "img/s" in out and "ETA" in out and "validation top-1" in out
  for key in ("val_top1", "test_top1", "trainable_params", "trainable_percent_of_backbone",
              "config", "wall_time_s"):
    assert key in results
  assert results["steps"] == 2 * SPE and results["trainable_params"] == 2 * 8 * 64 + 64 * 10 + 10
  with open(os.path.join(wd, "results.json")) as f:
    assert json.load(f)["test_top1"] == results["test_top1"]
  records = [json.loads(l) for l in open(os.path.join(wd, "metrics.jsonl"))]
  assert any("train/loss" in r for r in records) and any("val/top1" in r for r in records)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tb")))
  assert os.listdir(os.path.join(wd, "checkpoints", "best"))

  # The default checkpoint is the one results.json reports (the last), and it says so.
  tuned = workdir_lib.load_tuned(wd)
  assert (tuned.checkpoint, tuned.step) == ("last", results["steps"])
  assert "results.json" in tuned.describe()
  # The saved prompts + the public backbone predict exactly like the trained model.
  model, variables = workdir_lib.load_tuned(wd, which="last")
  config = workdir_lib.read_config(wd)
  test = sources.load_splits(config.data, [config.data.test_split])[config.data.test_split]
  pipe = pipeline.Pipeline(test, pipeline.make_preprocess(config.data, 32, False),
                           batch_size=64, seed=0)
  correct = n = 0
  apply = jax.jit(model.apply)
  for b in pipe.eval_batches():
    pred = np.argmax(apply(variables, b["image"]), -1)
    correct += float(((pred == b["label"]) * b["mask"]).sum())
    n += float(b["mask"].sum())
  assert correct / n == pytest.approx(results["test_top1"], abs=1e-9)


def _finished_steps(workdir):
  d = os.path.join(workdir, "checkpoints", "last")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


# 3 epochs of SPE steps: the kill lands after the first checkpoint (step 2) and the
# resumed run crosses two epoch boundaries (new shuffles, evaluations) before it ends.
RESUME = f"vpt-deep,{FAST},optim.epochs=3,checkpoint_every_steps=2"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the RESUME config (in this process: only the killed run must be a
  process of its own)."""
  wd = str(tmp_path_factory.mktemp("reference"))
  loop.train_and_evaluate(demo.get_config(RESUME), wd)
  return wd


def test_resume_after_kill_is_bit_identical(tmp_path, reference, capsys):
  """`python -m vpt_jax.main` killed with SIGKILL after its first checkpoint; the resumed run (in
  this process, the same trainer) ends bit-identical to the uninterrupted one."""
  wd = str(tmp_path / "killed")
  proc = cli(wd, RESUME, popen=True)
  deadline = time.time() + 300
  while not _finished_steps(wd) and time.time() < deadline and proc.poll() is None:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(wd, "results.json")), "the run ended before the kill"
  killed_at = _finished_steps(wd)[-1]
  assert 0 < killed_at < 3 * SPE
  capsys.readouterr()
  loop.train_and_evaluate(demo.get_config(RESUME), wd)
  assert f"resuming from {wd}/checkpoints/last at step" in capsys.readouterr().out
  ours, ref = final_trainable(wd), final_trainable(reference)
  for path, a, b in zip(rules.leaf_paths(ours), jax.tree.leaves(ours), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b, err_msg=path)


def test_restoring_onto_another_backbone_is_refused(tmp_path):
  wd = str(tmp_path / "run")
  loop.train_and_evaluate(cfg(extra="optim.epochs=1"), wd)
  # Same architecture, one weight changed: a different backbone.
  from vpt_jax.weights import zoo
  with np.load(zoo.url_for("tiny-random")) as f:
    raw = {k: f[k] for k in f.files}
  raw["cls"] = raw["cls"] + 1.0
  other = str(tmp_path / "other.npz")
  np.savez(other, **raw)
  with pytest.raises(workdir_lib.FingerprintMismatch, match=r"backbone_sha256"):
    loop.train_and_evaluate(cfg(extra=f"optim.epochs=1,model.checkpoint={other}"), wd)
  with pytest.raises(workdir_lib.FingerprintMismatch, match=r"prompt_hooks.length: saved 8, now 4"):
    loop.train_and_evaluate(cfg(extra="optim.epochs=1,prompt.length=4"), wd)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  wd = str(tmp_path / "run")
  bad = cfg(extra="optim.lr=1e30,optim.momentum=0.0,checkpoint_every_steps=1,optim.epochs=3")
  with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d+") as e:
    loop.train_and_evaluate(bad, wd)
  steps = _finished_steps(wd)
  assert steps and f"last good checkpoint (step {steps[-1]})" in str(e.value)
  assert not os.path.exists(os.path.join(wd, "results.json"))
  model, variables = workdir_lib.load_tuned(wd, which="last")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


@pytest.mark.parametrize("extra,error,match", [
    ("prompt.length=-1", ValueError, r"prompt.length=-1"),
    ("prompt.pool=mean", ValueError, r"prompt.pool='mean'"),
    ("model.checkpoint=/no/such.npz", FileNotFoundError, r"/no/such.npz"),
    ("batch_size=0", ValueError, r"batch_size=0"),
    ("microbatch_size=-2", ValueError, r"microbatch_size=-2 must be >= 0"),
    ("optim.name=lamb", ValueError, r"optim.name='lamb'"),
    ("data.crop=zoom", ValueError, r"data.crop='zoom'"),
    ("protocol=lora", ValueError, r"unknown protocol 'lora'"),
])
def test_bad_options_fail_before_any_compute(tmp_path, extra, error, match):
  wd = tmp_path / "run"
  with pytest.raises(error, match=match):
    loop.train_and_evaluate(cfg(extra=extra), str(wd))
  assert not wd.exists() or not any(wd.iterdir())


def test_unknown_options_in_the_config_argument():
  """(An unknown --config.* flag of the command: test_faults, one process for both.)"""
  with pytest.raises(ValueError, match=r"unknown option 'prompt.lenght'"):
    demo.get_config("vpt-deep,prompt.lenght=3")
  with pytest.raises(ValueError, match=r"expected one of vpt-deep"):
    demo.get_config("vpt-dep")


def test_sweep_runs_every_arm_and_prints_a_table(tmp_path, capsys):
  rows = sweeps.run(os.path.join(ROOT, "configs", "demo.py"), str(tmp_path),
                   arms=[f"linear,{FAST},optim.epochs=1", f"vpt-shallow,{FAST},optim.epochs=1"])
  table = capsys.readouterr().out.split("=== vpt-shallow")[-1]
  assert [r["config"]["protocol"] for r in rows] == ["linear", "vpt"]
  lines = [l for l in table.splitlines() if l.startswith(("linear", "vpt-shallow"))]
  assert len(lines) == 2 and f"{rows[0]['trainable_params']:,}" in lines[0]
  assert f"{100 * rows[1]['test_top1']:.1f}" in lines[1]


def test_vtab_config_through_tfds(tmp_path):
  """configs/vtab.py end to end on tfds' mock data (random examples with cifar100's features)."""
  import tensorflow_datasets as tfds
  from configs import vtab
  c = vtab.get_config("cifar100,model.checkpoint=tiny-random,model.image_size=0,batch_size=10,"
                      "optim.epochs=1,optim.warmup_epochs=0,log_every_steps=1")
  with tfds.testing.mock_data(num_examples=30):
    results = loop.train_and_evaluate(c, str(tmp_path))
  assert results["steps"] == 3 and results["config"]["model"]["num_classes"] == 100
  assert 0.0 <= results["test_top1"] <= 1.0 and "val_top1" in results


def test_training_on_a_users_image_folder(tmp_path):
  """Any root/class_name/*.png tree trains through the same pipeline (source 'folder')."""
  from PIL import Image
  rng = np.random.default_rng(0)
  for c, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
    d = tmp_path / "data" / f"class_{c}"
    d.mkdir(parents=True)
    for i in range(20):
      img = (rng.uniform(0.6, 1.0, (16, 16, 1)) * colour).astype(np.uint8)
      Image.fromarray(img).save(d / f"{i}.png")
  c = cfg(extra=f"data.source=folder,data.root={tmp_path / 'data'},data.train_split=train,"
                "data.val_split=val,data.test_split=val,batch_size=8,optim.epochs=5")
  results = loop.train_and_evaluate(c, str(tmp_path / "run"))
  assert results["config"]["model"]["num_classes"] == 2
  assert results["val_top1"] == 1.0  # red vs blue: trivially separable
