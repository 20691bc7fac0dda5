"""Aggregate finished runs into the VPT paper's Table-1 layout (Markdown and CSV).

    python -m vpt_jax.report /tmp/vtab/*/ /tmp/fgvc/*/ [--csv=table.csv]

Each directory is a protocol run (`protocol.json` from `vpt_jax.sweep --protocol`: the mean test
top-1 over the final seeds) or a single run (`results.json`). Rows are methods (protocol, and
VPT-deep / VPT-shallow) on a backbone (the `Backbone` column: zoo name or checkpoint file),
columns the VTAB-1k groups' means (Natural, Specialized, Structured: the unweighted mean of their
tasks, as the paper), the FGVC mean, and the total-params multiple over
the tasks reported, counted as the paper does: (shared backbone + sum of per-task trainable) /
backbone. A per-task table follows. Segmentation runs (`results.json` with task_type
'segmentation') go into a table of their own in the paper's Table-3 layout: protocol, trainable
parameters (heads included, as the paper counts them), mIoU single-scale and multi-scale.
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
    if p.get("location") == "pad" and not p["deep"]:  # the ConvNets' prompt (VPT Table 5)
      return "VPT-pad"
    name = "VPT-deep" if p["deep"] else "VPT-shallow"
    return name + (" (pruned)" if p.get("mask_file") else "")
  return {"linear": "Linear", "full": "Full", "bias": "Bias"}.get(config["protocol"],
                                                                    config["protocol"])


def backbone_name(config: Dict) -> str:
  """The backbone column: the zoo name, or the checkpoint file's name."""
  model = config.get("model", {})
  spec = str(model.get("checkpoint", ""))
  return os.path.basename(spec.rstrip("/")) or "?"


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
  if r.get("task_type") == "segmentation":
    return seg_record(directory, r)
  if top1 is None:
    raise ValueError(f"{directory}: the run has no test result (config data.test_split is empty)")
  config = r["config"]
  shared = round(r["per_task_multiple"] - r["trainable_params"] / r["backbone_params"])
  return {"dir": directory, "task": config.get("task") or os.path.basename(directory.rstrip("/")),
          "group": config.get("group", ""), "method": method_name(config),
          "backbone": backbone_name(config), "test_top1": top1,
          "seeds": seeds, "trainable_params": r["trainable_params"],
          "backbone_params": r["backbone_params"], "shared_backbone": bool(shared)}


SEG_METHODS = {"full": "Full", "head": "Head only", "bias": "Bias", "vpt": "VPT-deep",
               "vpt+bias": "VPT+Bias", "e2vpt": "E2VPT"}


def seg_record(directory: str, r: Dict) -> Dict:
  """A segmentation run's row of Table 3."""
  config = r["config"]
  return {"dir": directory, "kind": "segmentation",
          "task": config.get("task") or os.path.basename(directory.rstrip("/")),
          "method": SEG_METHODS.get(r["protocol"], r["protocol"]),
          "trainable_params": r["trainable_params"], "head_params": r["head_params"],
          "mIoU_ss": r.get("mIoU_ss"), "mIoU_ms": r.get("mIoU_ms")}


def seg_table(records: Sequence[Dict]) -> str:
  """Table 3's layout (Markdown): one row per segmentation run."""
  pct = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
  lines = ["| Task | Method | Trainable params (M, heads incl.) | mIoU (ss) | mIoU (ms) |",
           "| --- | --- | --- | --- | --- |"]
  for r in records:
    lines.append(f"| {r['task']} | {r['method']} | {r['trainable_params'] / 1e6:.3f} | "
                 f"{pct(r['mIoU_ss'])} | {pct(r['mIoU_ms'])} |")
  return "\n".join(lines)


def tables(records: Sequence[Dict]) -> Dict[str, str]:
  """{'markdown': ..., 'csv': ...} for the records (segmentation runs in a Table-3 table)."""
  segs = [r for r in records if r.get("kind") == "segmentation"]
  records = [r for r in records if r.get("kind") != "segmentation"]
  if not records:
    return {"markdown": seg_table(segs), "csv": ""}
  if segs:
    out = tables(records)
    return {"markdown": out["markdown"] + "\n\n" + seg_table(segs), "csv": out["csv"]}
  # One row per (method, backbone): the papers compare methods on each backbone.
  methods = list(dict.fromkeys((r["method"], r.get("backbone", "?")) for r in records))
  tasks = list(dict.fromkeys(r["task"] for r in records))
  by = {}
  for r in records:
    key = (r["method"], r.get("backbone", "?"), r["task"])
    if key in by:
      raise ValueError(f"two runs of method {key[0]!r} on task {key[2]!r}: {by[key]['dir']} and "
                       f"{r['dir']} (backbone {key[1]}); report one of them")
    by[key] = r
  lines = ["| Method | Backbone | Total params | "
           + " | ".join(name for _, name in GROUP_COLUMNS) + " |",
           "| --- | --- | --- |" + " --- |" * len(GROUP_COLUMNS)]
  for m, bb in methods:
    rows = [r for r in records if (r["method"], r.get("backbone", "?")) == (m, bb)]
    b = rows[0]["backbone_params"]
    total = (b * any(r["shared_backbone"] for r in rows) + sum(r["trainable_params"] for r in rows))
    cells = []
    for group, _ in GROUP_COLUMNS:
      vals = [100 * r["test_top1"] for r in rows if r["group"] == group]
      cells.append(f"{sum(vals) / len(vals):.2f}" if vals else "-")
    lines.append(f"| {m} | {bb} | {total / b:.2f}x ({len(rows)} tasks) | " + " | ".join(cells)
                 + " |")
  lines += ["", "| Method | Backbone | " + " | ".join(tasks) + " |",
            "| --- | --- |" + " --- |" * len(tasks)]
  for m, bb in methods:
    cells = [f"{100 * by[(m, bb, t)]['test_top1']:.1f}" if (m, bb, t) in by else "-"
             for t in tasks]
    lines.append(f"| {m} | {bb} | " + " | ".join(cells) + " |")
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(["method", "backbone", "task", "group", "test_top1", "seeds", "trainable_params",
              "backbone_params", "dir"])
  for r in records:
    w.writerow([r["method"], r.get("backbone", "?"), r["task"], r["group"],
                f"{r['test_top1']:.6f}", r["seeds"],
                r["trainable_params"], r["backbone_params"], r["dir"]])
  return {"markdown": "\n".join(lines), "csv": buf.getvalue()}
