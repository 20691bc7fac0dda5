"""A head-only grid trained at once (vmap over lr and wd) equals the points trained one by one."""

import json
import os

import jax
import numpy as np
import pytest

from configs import demo
from conftest import ROOT, SMALL_DIGITS
from vpt_jax.tuning import grid, loop, rules, sweeps
from vpt_jax.tuning import workdir as workdir_lib

FAST = "model.checkpoint=tiny-random,optim.epochs=2,optim.warmup_epochs=1,eval_every_epochs=1," \
       f"log_every_steps=6,{SMALL_DIGITS}"
# Two lrs, with and without decay: the points must really differ. (At lr >= 0.5 the random
# backbone's large features make SGD chaotic: vmap's 1-ulp differences grow to ~1e-5 in 26 steps.)
POINTS = [(0.05, 0.0), (0.2, 1e-2)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The grid trained with vmap and with map, and its second point as its own run."""
  base = tmp_path_factory.mktemp("grid")
  config = demo.get_config(f"linear,{FAST}")
  together = {}
  for batching in ("vmap", "map"):
    together[batching] = grid.train_grid(
        config, [(lr, wd, str(base / f"{batching}{i}")) for i, (lr, wd) in enumerate(POINTS)],
        return_trainable=True, batching=batching)
  lr, wd = POINTS[1]
  single = loop.train_and_evaluate(
      demo.get_config(f"linear,{FAST},optim.lr={lr},optim.wd={wd}"), str(base / "single"))
  return base, together, (single, workdir_lib.load_tuned(str(base / "single")).split()[0])


def _point(stacked, i):
  return jax.tree.leaves(jax.tree.map(lambda x: x[i], stacked))


def test_map_batching_is_bit_identical_to_the_run(runs):
  base, together, (single, trainable) = runs
  results, stacked = together["map"]
  for path, a, b in zip(rules.leaf_paths(trainable), _point(stacked, 1),
                        jax.tree.leaves(trainable)):
    np.testing.assert_array_equal(a, b, err_msg=path)
  for key in ("val_top1", "test_top1", "best_val_top1", "val_loss", "test_loss",
              "trainable_params", "steps"):
    assert results[1][key] == single[key], key
  with open(os.path.join(base, "map1", "results.json")) as f:
    assert json.load(f)["config"]["optim"] == json.loads(json.dumps(single["config"]["optim"]))


def test_vmap_batching_equals_the_runs_to_rounding(runs):
  _, together, (single, _) = runs
  (vmapped, v_stacked), (mapped, m_stacked) = together["vmap"], together["map"]
  for i in range(len(POINTS)):  # map is each point's own run (above)
    for a, b in zip(_point(v_stacked, i), _point(m_stacked, i)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=str(POINTS[i]))
    assert vmapped[i]["val_top1"] == mapped[i]["val_top1"]
    assert vmapped[i]["test_top1"] == mapped[i]["test_top1"]
    assert vmapped[i]["val_loss"] == pytest.approx(mapped[i]["val_loss"], rel=1e-6)
  assert vmapped[1]["test_top1"] == single["test_top1"]
  # The points really differ (a grid of identical runs would pass the above trivially).
  a, b = (_point(v_stacked, i)[-1] for i in range(2))
  assert np.abs(a - b).max() > 1e-3


def test_mlp_head_grid_is_bit_identical_with_map(tmp_path):
  """MLP-k (a 2-layer head on the cached features) qualifies too."""
  (_, r), stacked = grid.train_grid(
      demo.get_config(f"mlp-2,{FAST}"),
      [(lr, wd, str(tmp_path / f"g{i}")) for i, (lr, wd) in enumerate(POINTS)],
      return_trainable=True, batching="map")
  lr, wd = POINTS[1]
  single = loop.train_and_evaluate(demo.get_config(f"mlp-2,{FAST},optim.lr={lr},optim.wd={wd}"),
                                   str(tmp_path / "single"))
  trainable = workdir_lib.load_tuned(str(tmp_path / "single")).split()[0]
  assert r["val_top1"] == single["val_top1"]
  assert r["trainable_params"] == single["trainable_params"] > 64 * 10 + 10  # more than linear
  for a, b in zip(jax.tree.leaves(jax.tree.map(lambda x: x[1], stacked)),
                  jax.tree.leaves(trainable)):
    np.testing.assert_array_equal(a, b)


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
