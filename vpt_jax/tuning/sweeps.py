"""Run several configurations one after another: a config's arms, or the paper's protocol.

    python -m vpt_jax.sweep --config=configs/demo.py --workdir=/tmp/vpt_demo
    python -m vpt_jax.sweep --config=configs/vtab.py:cifar100 --workdir=/tmp/cifar100 --protocol

Arms: the config file's `get_sweep()` lists them (arguments of its `get_config`); repeated `--arm`
flags pick others. Each arm runs in `workdir/<arm>` and its results feed a table.

--protocol, the VPT paper's tuning protocol for the task given after ':': every (lr, wd) of the
config's LR_GRID x WD_GRID trains on train800 and is scored by its last-epoch val200 top-1; the best
(ties to the smaller lr) is retrained with each of SEEDS on train800val200 and scored on test;
`workdir/protocol.json` holds the grid, the choice and the test top-1 per seed and their mean.
Grid values are quoted per 256 images, as the official scripts do, and used at lr * batch / 256.
The prompt length is a tuned hyperparameter in the paper: with a length grid (the config file's
PROMPT_LENGTH_GRID, or `length_grid`), every (p, lr, wd) trains in `grid/p{p}_lr{lr}_wd{wd}` and
the best on val200 (ties to the smaller lr, then the shorter prompt) fixes p for the final runs.
E2VPT also tunes its key-value prompt length: a KV_LENGTH_GRID (or `kv_length_grid`) adds it to the
search the same way (`grid/p{p}_kv{k}_lr{lr}_wd{wd}`; ties to fewer key-value prompts).
Everything is resumable: a finished run (with results.json) is never rerun, an interrupted one
continues from its checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Dict, List, Sequence

from vpt_jax.tuning import loop, seg_loop


def load_config_module(path: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} not found")
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def table(rows: List[Dict]) -> str:
  """A fixed-width text table of arm results (Table 3's layout for segmentation runs)."""
  if rows and all(r.get("task_type") == "segmentation" for r in rows):
    return seg_loop.table(rows)
  head = ["arm", "protocol", "trainable params", "% of backbone", "val top-1", "test top-1",
          "time (s)"]
  lines = []
  for r in rows:
    fmt = lambda k: "-" if r.get(k) is None else f"{100 * r[k]:.1f}"
    lines.append([r["arm"], r["config"]["protocol"], f"{r['trainable_params']:,}",
                  f"{r['trainable_percent_of_backbone']:.2f}", fmt("val_top1"), fmt("test_top1"),
                  f"{r['wall_time_s']:.0f}"])
  widths = [max(len(x) for x in col) for col in zip(head, *lines)]
  out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)),
         "-|-".join("-" * w for w in widths)]
  out += [" | ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
  return "\n".join(out)


def run(config_path: str, workdir: str, arms: Sequence[str] | None = None) -> List[Dict]:
  module = load_config_module(config_path)
  arms = list(arms or module.get_sweep())
  configs = {arm: module.get_config(arm) for arm in arms}  # all checked before any training
  rows = []
  for arm, config in configs.items():
    print(f"=== {arm} ===", flush=True)
    results = loop.train_and_evaluate(config, os.path.join(workdir, arm))
    rows.append({"arm": arm.split(",")[0], **results})
  print(table(rows), flush=True)
  return rows


def _finished(workdir: str) -> Dict | None:
  path = os.path.join(workdir, "results.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return None


def run_protocol(config_path: str, arg: str, workdir: str, *, lr_grid=None, wd_grid=None,
                 seeds=None, length_grid=None, kv_length_grid=None) -> Dict:
  """The paper's protocol for one task; see the module docstring."""
  module = load_config_module(config_path)
  lengths = [int(x) for x in (length_grid or getattr(module, "PROMPT_LENGTH_GRID", ()) or ())]
  kv_lengths = [int(x) for x in (kv_length_grid or getattr(module, "KV_LENGTH_GRID", ()) or ())]
  lr_grid = [float(x) for x in (lr_grid or (module.lr_grid(arg) if hasattr(module, "lr_grid")
                                             else module.LR_GRID))]
  wd_grid = [float(x) for x in (wd_grid or module.WD_GRID)]
  seeds = [int(x) for x in (seeds or module.SEEDS)]
  batch = module.get_config(arg).batch_size  # also checks the argument before any training
  prefix = f"{arg}," if arg else ""

  def run(sub: str, extra: str) -> Dict:
    d = os.path.join(workdir, sub)
    done = _finished(d)
    if done is not None:
      print(f"=== {sub}: finished earlier, not rerun ===", flush=True)
      return done
    print(f"=== {sub} ===", flush=True)
    return loop.train_and_evaluate(module.get_config(prefix + extra), d)

  def prompt_shape(g: Dict) -> tuple:
    """(directory prefix, config overrides) of a grid point's prompt lengths."""
    name = "".join(f"{tag}{g[key]}_" for key, tag in (("length", "p"), ("kv_length", "kv"))
                   if key in g)
    extra = "".join(f",prompt.{key}={g[key]}" for key in ("length", "kv_length") if key in g)
    return name, extra

  grid = []
  for p in lengths or [None]:
    for k in kv_lengths or [None]:
      shape = {key: v for key, v in (("length", p), ("kv_length", k)) if v is not None}
      name, extra = prompt_shape(shape)
      for lr in lr_grid:
        for wd in wd_grid:
          r = run(f"grid/{name}lr{lr:g}_wd{wd:g}",
                  f"optim.lr={lr * batch / 256!r},optim.wd={wd!r}{extra}")
          if r.get("val_top1") is None:
            raise ValueError(f"{config_path}:{arg} has no validation split to select on")
          grid.append({"lr": lr, "wd": wd, "val_top1": r["val_top1"]} | shape)
  best = max(grid, key=lambda g: (g["val_top1"], -g["lr"], -g.get("length", 0),
                                  -g.get("kv_length", 0)))
  finals = []
  for seed in seeds:
    extra = prompt_shape(best)[1]
    r = run(f"final/seed{seed}", f"final,optim.lr={best['lr'] * batch / 256!r},"
                                 f"optim.wd={best['wd']!r},seed={seed}{extra}")
    finals.append({"seed": seed, "test_top1": r["test_top1"], "results": r})
  tops = [f["test_top1"] for f in finals]
  summary = {
      "config": f"{config_path}:{arg}", "lr_grid_per_256": lr_grid, "wd_grid": wd_grid,
      "length_grid": lengths, "kv_length_grid": kv_lengths,
      "batch_size": batch, "grid": grid, "best": best,
      "final": [{k: v for k, v in f.items() if k != "results"} for f in finals],
      "test_top1_mean": float(sum(tops) / len(tops)),
      "test_top1_std": float(
          (sum((t - sum(tops) / len(tops)) ** 2 for t in tops) / len(tops)) ** .5),
      "results": finals[0]["results"],  # config, parameter counts (the same for every seed)
  }
  with open(os.path.join(workdir, "protocol.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
  print(f"best lr {best['lr']:g} (per 256) wd {best['wd']:g}: val {100 * best['val_top1']:.1f}; "
        f"test {100 * summary['test_top1_mean']:.2f} +- {100 * summary['test_top1_std']:.2f} "
        f"over seeds {seeds}", flush=True)
  return summary
