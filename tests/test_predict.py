"""The predict command: pretrained checkpoints (tuned runs are covered in test_main.py)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import vpt_jax
from conftest import ROOT
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
  probs = np.asarray(jax.nn.softmax(model.apply(variables, pixels / 127.5 - 1.0)))
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
  out = subprocess.run([sys.executable, "-m", "vpt_jax.predict", "--checkpoint=tiny-random"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
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
