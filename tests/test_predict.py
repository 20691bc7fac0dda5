"""The offline predict command and its config."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import vpt_jax
from configs import demo
from conftest import ROOT
from vpt_jax import predict


def test_predictions_equal_the_models_softmax(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  paths = []
  for i, p in enumerate(pixels):
    paths.append(str(tmp_path / f"img{i}.png"))
    Image.fromarray(p).save(paths[-1])
  config = demo.get_config()
  config.predict.images = ",".join(paths)
  config.predict.top_k = 4
  got = predict.predict(config)

  model, variables = vpt_jax.load_pretrained("tiny-random")
  probs = np.asarray(jax.nn.softmax(model.apply(variables, pixels / 127.5 - 1.0)))
  assert [name for name, _ in got] == paths
  for (_, top), p in zip(got, probs):
    classes = [c for c, _ in top]
    assert classes == list(np.argsort(-p)[:4])
    np.testing.assert_allclose([q for _, q in top], p[classes], rtol=1e-5)


def test_bad_config_values_are_named(tmp_path):
  config = demo.get_config()
  config.predict.images = str(tmp_path / "missing.jpg")
  with pytest.raises(FileNotFoundError, match="predict.images.*missing.jpg"):
    predict.predict(config)
  (tmp_path / "text.jpg").write_text("not an image")
  config.predict.images = str(tmp_path / "text.jpg")
  with pytest.raises(ValueError, match="predict.images.*text.jpg"):
    predict.predict(config)
  config = demo.get_config()
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match="model.dtype='float16'"):
    predict.predict(config)


def test_readme_demo_command_runs_offline():
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-m", "vpt_jax.predict", "--config=configs/demo.py"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if ": class " in l]
  assert len(lines) == 4 and lines[0].startswith("gradient-horizontal: class ")
  assert "width 64, depth 2" in out.stdout
