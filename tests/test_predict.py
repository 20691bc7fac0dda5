"""The predict command: pretrained checkpoints (tuned runs are covered in test_main.py)."""

import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import vpt_jax
from conftest import ROOT, jit_apply
import forked_cli
from vpt_jax.tasks import classification


def test_predictions_equal_the_models_softmax(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  paths = []
  for i, p in enumerate(pixels):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(p).save(paths[-1])
  model, variables = vpt_jax.load_pretrained("tiny-random")
  got = classification.predict(model, variables, paths, top_k=4)
  probs = np.asarray(jax.nn.softmax(jit_apply(model, variables, pixels / 127.5 - 1.0)))
  assert [name for name, _ in got] == paths
  for (_, top), p in zip(got, probs):
    classes = [c for c, _ in top]
    assert classes == list(np.argsort(-p)[:4])
    np.testing.assert_allclose([q for _, q in top], p[classes], rtol=1e-5)


def test_bad_image_files_are_named(tmp_path):
  model, variables = vpt_jax.load_pretrained("tiny-random")
  with pytest.raises(FileNotFoundError, match="missing.jpg"):
    classification.predict(model, variables, [str(tmp_path / "missing.jpg")])
  (tmp_path / "text.jpg").write_text("not an image")
  with pytest.raises(ValueError, match="text.jpg"):
    classification.predict(model, variables, [str(tmp_path / "text.jpg")])


def test_command_runs_offline_on_test_patterns():
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = forked_cli.run([sys.executable, "-m", "vpt_jax.predict", "--checkpoint=tiny-random"],
                       cwd=ROOT, env=env, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if ": class " in l]
  assert len(lines) == 4 and lines[0].startswith("gradient-horizontal: class ")
  assert "width 64, depth 2" in out.stdout


def test_config_of_an_older_version_gets_the_new_options_at_their_defaults():
  from vpt_jax.tuning import workdir as workdir_lib
  old = {"model": {"checkpoint": "demo-vit"}, "prompt": {"length": 4}, "seed": 0}
  new = workdir_lib.with_new_defaults(old)
  assert new["model"] == {"checkpoint": "demo-vit", "fast_path": True}
  assert new["prompt"]["length"] == 4 and new["prompt"]["masks"] is False
  assert new["prompt"]["init_seed"] == -1 and new["cache_features"] == "auto"
  assert "token_fraction" in new["prune"] and new["seed"] == 0


def test_pytorch_checkpoint_predicts_with_its_own_head_and_imagenet_inputs(tmp_path):
  """MoCo v3's linear-eval file (tests/data/backbones) through `weights.backbones`: the file's
  100-class classifier gives the official `ckpt_head_logits`; files are read as VPT feeds them."""
  from conftest import ATOL, RTOL, data_path, load_io
  from vpt_jax import predict
  from vpt_jax.weights import download
  model, variables, read, inputs = predict.load_checkpoint(
      data_path("backbones/mocov3_vit.pth.tar"), num_heads=4)
  io = load_io("backbones/mocov3_vit.io.npz")
  assert model.num_classes == 100 and inputs == "ImageNet mean/std"
  pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  path = str(tmp_path / "a.png")
  Image.fromarray(pixels).save(path)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(read(path), (pixels / 255.0 - mean) / std, atol=1e-5)
  batch = np.concatenate([io["images"].transpose(0, 2, 3, 1), read(path)[None]])
  logits = np.asarray(jax.jit(model.apply)(variables, batch))
  np.testing.assert_allclose(logits[:4], io["plain/ckpt_head_logits"], atol=ATOL, rtol=RTOL)
  [(name, top)] = classification.predict(model, variables, [path], top_k=2, read=read)
  assert name == path and [c for c, _ in top] == list(np.argsort(-logits[4])[:2])
  with pytest.raises(download.CheckpointError, match=r"mae_vit.pth: this mae file has no "
                                                     r"classifier"):
    predict.load_checkpoint(data_path("backbones/mae_vit.pth"), num_heads=4)
  _, _, read, inputs = predict.load_checkpoint("tiny-random")
  assert read is None and inputs == "scaled to [-1, 1]"
