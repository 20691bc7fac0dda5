"""Aggregate finished runs into the VPT paper's Table-1 layout (Markdown and CSV).

    python -m vpt_jax.report /tmp/vtab/*/ /tmp/fgvc/*/ [--csv=table.csv]

Each directory is a protocol run (`protocol.json` from `vpt_jax.sweep --protocol`: the mean test
top-1 over the final seeds) or a single run (`results.json`). Rows are methods (protocol, and
VPT-deep / VPT-shallow), columns the VTAB-1k groups' means (Natural, Specialized, Structured: the
unweighted mean of their tasks, as the paper), the FGVC mean, and the total-params multiple over
the tasks reported, counted as the paper does: (shared backbone + sum of per-task trainable) /
backbone. A per-task table follows.
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Dict, Sequence

GROUP_COLUMNS = (("vtab-natural", "VTAB Natural"), ("vtab-specialized", "VTAB Specialized"),
                 ("vtab-structured", "VTAB Structured"), ("fgvc", "FGVC"))


def method_name(config: Dict) -> str:
  """The method, named by all that distinguishes runs of the vpt protocol: key-value prompts
  (E2VPT), pruned and rewound prompts (a fixed mask file), deep or shallow."""
  if config["protocol"] == "vpt":
    p = config["prompt"]
    if p.get("kv_length"):
      name = "E2VPT" if p["deep"] else "E2VPT-shallow"
      return name + (" (pruned)" if p.get("mask_file") else "")
    name = "VPT-deep" if p["deep"] else "VPT-shallow"
    return name + (" (pruned)" if p.get("mask_file") else "")
  return {"linear": "Linear", "full": "Full", "bias": "Bias"}.get(config["protocol"],
                                                                    config["protocol"])


def load_record(directory: str) -> Dict:
  """One task's result: test top-1 (mean over seeds for a protocol run) and its cost."""
  protocol = os.path.join(directory, "protocol.json")
  single = os.path.join(directory, "results.json")
  if os.path.exists(protocol):
    with open(protocol) as f:
      p = json.load(f)
    r, top1, seeds = p["results"], p["test_top1_mean"], len(p["final"])
  elif os.path.exists(single):
    with open(single) as f:
      r = json.load(f)
    top1, seeds = r.get("test_top1"), 1
  else:
    raise FileNotFoundError(f"{directory}: neither protocol.json nor results.json (not a "
                            "finished vpt_jax run)")
  if top1 is None:
    raise ValueError(f"{directory}: the run has no test result (config data.test_split is empty)")
  config = r["config"]
  shared = round(r["per_task_multiple"] - r["trainable_params"] / r["backbone_params"])
  return {"dir": directory, "task": config.get("task") or os.path.basename(directory.rstrip("/")),
          "group": config.get("group", ""), "method": method_name(config), "test_top1": top1,
          "seeds": seeds, "trainable_params": r["trainable_params"],
          "backbone_params": r["backbone_params"], "shared_backbone": bool(shared)}


def tables(records: Sequence[Dict]) -> Dict[str, str]:
  """{'markdown': ..., 'csv': ...} for the records."""
  methods = list(dict.fromkeys(r["method"] for r in records))
  tasks = list(dict.fromkeys(r["task"] for r in records))
  by = {}
  for r in records:
    key = (r["method"], r["task"])
    if key in by:
      raise ValueError(f"two runs of method {key[0]!r} on task {key[1]!r}: {by[key]['dir']} and "
                       f"{r['dir']}; report one of them")
    by[key] = r
  lines = ["| Method | Total params | " + " | ".join(name for _, name in GROUP_COLUMNS) + " |",
           "| --- | --- |" + " --- |" * len(GROUP_COLUMNS)]
  for m in methods:
    rows = [r for r in records if r["method"] == m]
    b = rows[0]["backbone_params"]
    total = (b * any(r["shared_backbone"] for r in rows) + sum(r["trainable_params"] for r in rows))
    cells = []
    for group, _ in GROUP_COLUMNS:
      vals = [100 * r["test_top1"] for r in rows if r["group"] == group]
      cells.append(f"{sum(vals) / len(vals):.2f}" if vals else "-")
    lines.append(f"| {m} | {total / b:.2f}x ({len(rows)} tasks) | " + " | ".join(cells) + " |")
  lines += ["", "| Method | " + " | ".join(tasks) + " |", "| --- |" + " --- |" * len(tasks)]
  for m in methods:
    cells = [f"{100 * by[(m, t)]['test_top1']:.1f}" if (m, t) in by else "-" for t in tasks]
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["method", "task", "group", "test_top1", "seeds", "trainable_params",
              "backbone_params", "dir"])
  for r in records:
    w.writerow([r["method"], r["task"], r["group"], f"{r['test_top1']:.6f}", r["seeds"],
                r["trainable_params"], r["backbone_params"], r["dir"]])
  return {"markdown": "\n".join(lines), "csv": buf.getvalue()}
