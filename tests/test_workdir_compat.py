"""Workdirs written by vpt_jax 0.1.0 (before the restructure) still load and predict the same;
the run fingerprint holds only what determines the parameters and their function."""

import json
import os
import shutil

import numpy as np
import pytest

import vpt_jax
from conftest import data_path, jit_apply
from vpt_jax.tuning import build, workdir as workdir_lib

RUNS = ("vpt_kv", "mlp2")


@pytest.fixture(scope="module")
def expected():
  with np.load(data_path("workdirs_v0_1/expected_logits.npz")) as f:
    return {k: f[k] for k in f.files}


@pytest.mark.parametrize("run", RUNS)
def test_old_workdir_loads_and_predicts_the_same(run, expected):
  tuned = vpt_jax.load_tuned(data_path(f"workdirs_v0_1/{run}"), which="last")
  logits = np.asarray(jit_apply(tuned.model, tuned.variables, expected["images"]))
  np.testing.assert_allclose(logits, expected[f"{run}_last"], rtol=1e-6, atol=1e-6)
  # Everything a consumer needs comes with it: the config and the trainable rule.
  assert tuned.config.protocol == {"vpt_kv": "vpt", "mlp2": "mlp-2"}[run]
  trainable, frozen = tuned.split()
  assert "head" in trainable["params"] and "Transformer" in frozen["params"]
  model, variables = tuned  # the (model, variables) form of 0.1.0
  assert model is tuned.model and variables is tuned.variables


def _copy_with(tmp_path, run, **model_options):
  wd = str(tmp_path / run)
  shutil.copytree(data_path(f"workdirs_v0_1/{run}"), wd)
  path = os.path.join(wd, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["model"].update(model_options)
  with open(path, "w") as f:
    json.dump(config, f)
  return wd


def test_old_workdir_loads_without_the_fast_path(tmp_path, expected):
  # 0.1.0 put the fast path's derived plan into the fingerprint: such a workdir was unloadable
  # with model.fast_path toggled, though the parameters are the same.
  tuned = vpt_jax.load_tuned(_copy_with(tmp_path, "vpt_kv", fast_path=False), which="last")
  assert not tuned.model.hooks.kv_only_layers
  logits = np.asarray(jit_apply(tuned.model, tuned.variables, expected["images"]))
  np.testing.assert_allclose(logits, expected["vpt_kv_last"], rtol=1e-5, atol=1e-5)


def test_old_workdir_still_refuses_another_model(tmp_path):
  wd = _copy_with(tmp_path, "vpt_kv", num_classes=7)
  with pytest.raises(workdir_lib.FingerprintMismatch, match=r"model.num_classes: saved 10, now 7"):
    vpt_jax.load_tuned(wd, which="last")


def test_fingerprint_holds_options_not_execution_choices():
  config = workdir_lib.read_config(data_path("workdirs_v0_1/vpt_kv"))
  fast = build.build(config).fingerprint()
  config.model.fast_path = False
  slow = build.build(config).fingerprint()
  assert fast == slow and fast["version"] == build.FINGERPRINT_VERSION
  assert "plan" not in fast["prompt_hooks"] and "kv_only_layers" not in fast["prompt_hooks"]
  assert fast["preprocessing"] == {"crop": "resize", "normalization": "minus_one_one",
                                   "resize_size": 256}
  config.prompt.length = 4
  assert build.describe_difference(fast, build.build(config).fingerprint())[:1] == [
      "prompt_hooks.length: saved 8, now 4"]
