"""A head-only protocol's 40-point lr x wd grid: trained together vs one run per point.

    python benchmarks/grid_batching.py                  # 8 of the 40 points run one by one
    python benchmarks/grid_batching.py --points=40      # all of them (~10 minutes on 2 cores)

The task is the offline demo's linear probe (shipped `demo-vit` backbone, scikit-learn digits:
train800, val200, test; batch 64, 30 epochs = 390 steps per point) over the paper's 40-point VTAB
grid (configs/vtab.py LR_GRID x WD_GRID, lr quoted per 256 images, used at lr x 64/256).
'together' is `vpt_jax.tuning.grid.train_grid` over all 40 points (batching 'vmap' and 'map'),
'one by one' is `loop.train_and_evaluate` per point, what `vpt_jax.sweep --protocol` does
without --grid_batching; both wall times cover everything (backbone load, feature caching,
compilation, training, evaluation, a point's checkpoints). One untimed run first warms up the
imports. One by one is timed on the first --points points (spread over the grid) and scaled to
40. Prints one JSON line: the wall times, the speedup, and the largest difference of val/test
top-1 between the two ways over the points run both ways. Goal (issue 18): >= 10x for linear.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import demo, vtab  # noqa: E402
from vpt_jax.tuning import grid, loop  # noqa: E402

BATCH = 64


def _quiet(fn, *a, **kw):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*a, **kw)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--points", type=int, default=8, help="points run one by one (of the 40)")
  ap.add_argument("--epochs", type=int, default=30)
  args = ap.parse_args()
  base = demo.get_config(f"linear,optim.epochs={args.epochs},optim.warmup_epochs="
                         f"{max(args.epochs // 10, 0)}")
  points = [(lr * BATCH / 256, wd) for lr in vtab.LR_GRID for wd in vtab.WD_GRID]
  step = max(len(points) // max(args.points, 1), 1)
  singles = list(range(0, len(points), step))[:args.points]
  out = {"benchmark": "grid_batching", "device": str(jax.devices()[0].device_kind),
         "backend": jax.default_backend(), "host": platform.node(), "cpus": os.cpu_count(),
         "task": "demo linear probe (demo-vit, digits train800/val200/test)",
         "grid_points": len(points), "steps_per_point": None, "one_by_one_points": len(singles)}
  with tempfile.TemporaryDirectory() as tmp:
    _quiet(loop.train_and_evaluate, demo.get_config("linear,optim.epochs=1,optim.warmup_epochs=0"),
           os.path.join(tmp, "warmup"))
    together = {}
    for batching in ("vmap", "map"):
      t = time.perf_counter()
      together[batching] = _quiet(grid.train_grid, base, [
          (lr, wd, os.path.join(tmp, batching, f"{i}")) for i, (lr, wd) in enumerate(points)],
                                  batching=batching)
      out[f"together_{batching}_s"] = round(time.perf_counter() - t, 2)
    out["steps_per_point"] = together["vmap"][0]["steps"]
    single_s, diffs = [], []
    for i in singles:
      lr, wd = points[i]
      c = demo.get_config(f"linear,optim.epochs={args.epochs},optim.warmup_epochs="
                          f"{max(args.epochs // 10, 0)},optim.lr={lr!r},optim.wd={wd!r}")
      t = time.perf_counter()
      r = _quiet(loop.train_and_evaluate, c, os.path.join(tmp, "single", f"{i}"))
      single_s.append(time.perf_counter() - t)
      for batching in ("vmap", "map"):
        v = together[batching][i]
        diffs.append((batching, max(abs(v["val_top1"] - r["val_top1"]),
                                    abs(v["test_top1"] - r["test_top1"]))))
  per_point = sum(single_s) / len(single_s)
  out.update({
      "one_by_one_per_point_s": round(per_point, 2),
      "one_by_one_40_points_s (scaled)": round(per_point * len(points), 1),
      "speedup_vmap": round(per_point * len(points) / out["together_vmap_s"], 1),
      "speedup_map": round(per_point * len(points) / out["together_map_s"], 1),
      "max_top1_difference_vmap": max(d for b, d in diffs if b == "vmap"),
      "max_top1_difference_map": max(d for b, d in diffs if b == "map"),
      "best_val_top1_vmap": max(r["val_top1"] for r in together["vmap"]),
  })
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
