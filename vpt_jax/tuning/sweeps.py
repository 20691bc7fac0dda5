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

Split across jobs (`vpt_jax.sweep --shard=i/n` or `--claim`), the same command runs in many jobs
at once on a shared workdir. shard=(i, n): the job runs every n-th run of each phase (grid, then
finals) from the i-th; a phase whose other shares are not finished yet ends the job, and running
any shard again once they are continues with the next phase (protocol.json is written by the job
that sees every final run finished). claim=True: each job claims runs one at a time
(`vpt_jax.tuning.claims`: atomic claim files, taken over from dead jobs), waits for the runs other
jobs hold, then goes on to the next phase; every job ends with the same protocol.json.

Head-only protocols (linear, MLP-k) on cached features can train the whole grid at once
(`grid_batching='vmap'` or 'map', `vpt_jax.tuning.grid`; opt-in): the grid's unfinished points
are trained together and write the results.json their runs would, then the protocol goes on as
usual (the final runs are ordinary runs).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from vpt_jax.tuning import claims, grid as grid_lib, loop, seg_loop


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
    try:
      with open(path) as f:
        return json.load(f)
    except json.JSONDecodeError:
      return None  # being written by another job, or cut short by a crash: not finished
  return None


def _phase(workdir: str, subs: List[str], start: Callable[[str], Dict], *,
           shard: Optional[Tuple[int, int]], claim: bool, poll_s: float,
           stale_after_s: float) -> Optional[Dict[str, Dict]]:
  """Runs this job's share of a phase's runs (all of them without shard or claim) and returns
  every run's results, or None when runs of other shards are not finished yet."""
  done: Dict[str, Dict] = {}
  if not claim:
    for i, sub in enumerate(subs):
      if shard is None or i % shard[1] == shard[0]:
        done[sub] = start(sub)
      elif (r := _finished(os.path.join(workdir, sub))) is not None:
        done[sub] = r
    return done if len(done) == len(subs) else None
  while True:
    for sub in subs:
      if sub in done:
        continue
      if (r := _finished(os.path.join(workdir, sub))) is not None:
        done[sub] = r
        continue
      held = claims.try_claim(os.path.join(workdir, sub) + ".claim", stale_after_s)
      if held is None:
        continue  # another live job runs it
      try:
        done[sub] = start(sub)  # finished meanwhile: start() returns its results, not rerun
      finally:
        held.release()
    if len(done) == len(subs):
      return done
    print(f"=== waiting for {len(subs) - len(done)} runs other jobs hold ===", flush=True)
    time.sleep(poll_s)


def run_protocol(config_path: str, arg: str, workdir: str, *, lr_grid=None, wd_grid=None,
                 seeds=None, length_grid=None, kv_length_grid=None,
                 shard: Optional[Tuple[int, int]] = None, claim: bool = False,
                 run_fn: Optional[Callable[..., Dict]] = None, poll_s: float = 30.0,
                 stale_after_s: float = claims.STALE_AFTER_S,
                 grid_batching: Optional[str] = None) -> Optional[Dict]:
  """The paper's protocol for one task; see the module docstring. Returns the summary, or None
  when this shard's share is done and other shards' runs are still missing.

  run_fn(config, workdir) -> results trains one run (default `loop.train_and_evaluate`).
  """
  if shard is not None and claim:
    raise ValueError("--shard and --claim are alternatives: use one")
  if shard is not None and not 0 <= shard[0] < shard[1]:
    raise ValueError(f"--shard={shard[0]}/{shard[1]}: need 0 <= i < n")
  if grid_batching and (shard is not None or claim):
    raise ValueError("--grid_batching trains the whole grid in one job: use it without --shard "
                     "or --claim")
  run_fn = run_fn or loop.train_and_evaluate
  module = load_config_module(config_path)
  lengths = [int(x) for x in (length_grid or getattr(module, "PROMPT_LENGTH_GRID", ()) or ())]
  kv_lengths = [int(x) for x in (kv_length_grid or getattr(module, "KV_LENGTH_GRID", ()) or ())]
  lr_grid = [float(x) for x in (lr_grid or (module.lr_grid(arg) if hasattr(module, "lr_grid")
                                             else module.LR_GRID))]
  wd_grid = [float(x) for x in (wd_grid or module.WD_GRID)]
  seeds = [int(x) for x in (seeds or module.SEEDS)]
  batch = module.get_config(arg).batch_size  # also checks the argument before any training
  prefix = f"{arg}," if arg else ""
  split = dict(shard=shard, claim=claim, poll_s=poll_s, stale_after_s=stale_after_s)
  extras: Dict[str, str] = {}

  def run(sub: str) -> Dict:
    d = os.path.join(workdir, sub)
    done = _finished(d)
    if done is not None:
      print(f"=== {sub}: finished earlier, not rerun ===", flush=True)
      return done
    print(f"=== {sub} ===", flush=True)
    return run_fn(module.get_config(prefix + extras[sub]), d)

  def prompt_shape(g: Dict) -> tuple:
    """(directory prefix, config overrides) of a grid point's prompt lengths."""
    name = "".join(f"{tag}{g[key]}_" for key, tag in (("length", "p"), ("kv_length", "kv"))
                   if key in g)
    extra = "".join(f",prompt.{key}={g[key]}" for key in ("length", "kv_length") if key in g)
    return name, extra

  points = {}
  for p in lengths or [None]:
    for k in kv_lengths or [None]:
      shape = {key: v for key, v in (("length", p), ("kv_length", k)) if v is not None}
      name, extra = prompt_shape(shape)
      for lr in lr_grid:
        for wd in wd_grid:
          sub = f"grid/{name}lr{lr:g}_wd{wd:g}"
          extras[sub] = f"optim.lr={lr * batch / 256!r},optim.wd={wd!r}{extra}"
          points[sub] = {"lr": lr, "wd": wd} | shape
  if grid_batching:
    shapes: Dict[str, List[str]] = {}
    for sub in points:
      if _finished(os.path.join(workdir, sub)) is None:
        shapes.setdefault(prompt_shape(points[sub])[0], []).append(sub)
    for subs in shapes.values():
      print(f"=== grid: {len(subs)} points trained together ({grid_batching}) ===", flush=True)
      grid_lib.train_grid(
          module.get_config(prefix + extras[subs[0]]),
          [(points[sub]["lr"] * batch / 256, points[sub]["wd"], os.path.join(workdir, sub))
           for sub in subs], scratch=os.path.join(workdir, "grid", "_together"),
          batching=grid_batching)
  done = _phase(workdir, list(points), run, **split)
  if done is None:
    return _incomplete("grid", shard)
  grid = []
  for sub, point in points.items():
    if done[sub].get("val_top1") is None:
      raise ValueError(f"{config_path}:{arg} has no validation split to select on")
    grid.append({"lr": point["lr"], "wd": point["wd"], "val_top1": done[sub]["val_top1"]}
                | {k: v for k, v in point.items() if k not in ("lr", "wd")})
  best = max(grid, key=lambda g: (g["val_top1"], -g["lr"], -g.get("length", 0),
                                  -g.get("kv_length", 0)))
  for seed in seeds:
    extras[f"final/seed{seed}"] = (f"final,optim.lr={best['lr'] * batch / 256!r},"
                                   f"optim.wd={best['wd']!r},seed={seed}{prompt_shape(best)[1]}")
  done = _phase(workdir, [f"final/seed{seed}" for seed in seeds], run, **split)
  if done is None:
    return _incomplete("final", shard)
  finals = [{"seed": seed, "test_top1": done[f"final/seed{seed}"]["test_top1"],
             "results": done[f"final/seed{seed}"]} for seed in seeds]
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
  # Several jobs may end here at once: each writes the same summary, renamed into place whole.
  tmp = os.path.join(workdir, f"protocol.json.{os.getpid()}.tmp")
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2, default=str)
  os.replace(tmp, os.path.join(workdir, "protocol.json"))
  print(f"best lr {best['lr']:g} (per 256) wd {best['wd']:g}: val {100 * best['val_top1']:.1f}; "
        f"test {100 * summary['test_top1_mean']:.2f} +- {100 * summary['test_top1_std']:.2f} "
        f"over seeds {seeds}", flush=True)
  return summary


def _incomplete(phase: str, shard: Tuple[int, int]) -> None:
  print(f"=== shard {shard[0]}/{shard[1]}: its {phase} runs are finished, other shards' are not; "
        f"run any shard again once they are to continue ===", flush=True)
  return None
