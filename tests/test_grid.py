"""A head-only grid trained at once (vmap over lr and wd) equals the points trained one by one."""

import json
import os

import jax
import numpy as np
import pytest

from configs import demo
from conftest import ROOT
from vpt_jax.tuning import grid, loop, rules, sweeps
from vpt_jax.tuning import workdir as workdir_lib

FAST = "model.checkpoint=tiny-random,optim.epochs=2,optim.warmup_epochs=1,eval_every_epochs=1," \
       "log_every_steps=6"
# Two lrs, with and without decay: the points must really differ. (At lr >= 0.5 the random
# backbone's large features make SGD chaotic: vmap's 1-ulp differences grow to ~1e-5 in 26 steps.)
POINTS = [(0.05, 0.0), (0.2, 1e-2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  base = tmp_path_factory.mktemp("grid")
  config = demo.get_config(f"linear,{FAST}")
  vmapped, stacked = grid.train_grid(
      config, [(lr, wd, str(base / f"v_lr{lr}_wd{wd}")) for lr, wd in POINTS],
      return_trainable=True)
  _, mapped = grid.train_grid(
      config, [(lr, wd, str(base / f"m_lr{lr}_wd{wd}")) for lr, wd in POINTS],
      return_trainable=True, batching="map")
  single = []
  for lr, wd in POINTS:
    wd_dir = str(base / f"s_lr{lr}_wd{wd}")
    results = loop.train_and_evaluate(
        demo.get_config(f"linear,{FAST},optim.lr={lr},optim.wd={wd}"), wd_dir)
    tuned = workdir_lib.load_tuned(wd_dir)
    single.append((results, tuned.split()[0]))
  return base, vmapped, stacked, mapped, single


def test_each_point_equals_its_own_run(runs):
  base, vmapped, stacked, _, single = runs
  for i, (v, (s, trainable)) in enumerate(zip(vmapped, single)):
    for key in ("val_top1", "test_top1", "best_val_top1", "trainable_params"):
      assert v[key] == s[key], (POINTS[i], key)
    for key in ("val_loss", "test_loss"):
      assert v[key] == pytest.approx(s[key], rel=1e-6), (POINTS[i], key)
    point = jax.tree.map(lambda x: x[i], stacked)
    for path, a, b in zip(rules.leaf_paths(trainable), jax.tree.leaves(point),
                          jax.tree.leaves(trainable)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f"{POINTS[i]} {path}")
    with open(os.path.join(base, f"v_lr{POINTS[i][0]}_wd{POINTS[i][1]}", "results.json")) as f:
      assert json.load(f)["config"]["optim"]["lr"] == POINTS[i][0]
  # The points really differ (a grid of identical runs would pass the above trivially).
  heads = [np.asarray(jax.tree.leaves(jax.tree.map(lambda x: x[i], stacked))[-1])
           for i in range(len(POINTS))]
  assert min(np.abs(a - b).max() for a in heads for b in heads if a is not b) > 1e-3


def test_map_batching_is_bit_identical_to_the_runs(runs):
  _, _, _, mapped, single = runs
  for i, (_, trainable) in enumerate(single):
    point = jax.tree.map(lambda x: x[i], mapped)
    for path, a, b in zip(rules.leaf_paths(trainable), jax.tree.leaves(point),
                          jax.tree.leaves(trainable)):
      np.testing.assert_array_equal(a, b, err_msg=f"{POINTS[i]} {path}")


def test_prompt_protocols_are_refused(tmp_path):
  with pytest.raises(ValueError, match="head-only protocols on cached features"):
    grid.train_grid(demo.get_config(f"vpt-shallow,{FAST}"), [(1.0, 0.0, str(tmp_path / "a"))])


def test_points_may_differ_only_in_lr_and_wd(tmp_path):
  with pytest.raises(ValueError, match="optim.lr=-1.0 must be > 0"):
    grid.train_grid(demo.get_config(f"linear,{FAST}"), [(-1.0, 0.0, str(tmp_path / "a"))])


def test_protocol_trains_its_grid_together(tmp_path, monkeypatch):
  """--grid_batching: the grid's points come from one vmapped training (results.json says so),
  the final runs are ordinary runs (a fake here: counted, not trained)."""
  calls = []

  def fake(config, workdir):
    calls.append(os.path.relpath(workdir, tmp_path))
    return {"test_top1": 0.5}
  monkeypatch.setattr(loop, "train_and_evaluate", fake)
  s = sweeps.run_protocol(os.path.join(ROOT, "configs", "demo.py"), f"linear,{FAST}", str(tmp_path),
                          lr_grid=["12.8", "51.2"], wd_grid=["0.0"], seeds=["0"],
                          grid_batching="vmap")
  assert calls == ["final/seed0"]
  for lr in ("12.8", "51.2"):
    with open(tmp_path / "grid" / f"lr{lr}_wd0" / "results.json") as f:
      r = json.load(f)
    assert r["vmapped_grid"] == 2 and r["config"]["optim"]["lr"] == pytest.approx(
        float(lr) * 64 / 256)
  assert s["best"]["lr"] in (12.8, 51.2) and len(s["grid"]) == 2
