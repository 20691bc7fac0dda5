"""Where a train step's time goes on this machine: per kind of op, from the JAX profiler.

    python benchmarks/step_profile.py                          # ViT-S/16 at 224, batch 8
    python benchmarks/step_profile.py --model=vit-b16 --protocols=vpt_deep_p50 --steps=3

Prints one JSON line. For each (protocol, path) the compiled train step (the trainer's, with the
gradient-norm logging; `linear` is the plain ViT's forward plus the head's gradient) runs under
`jax.profiler.trace`; XLA's CPU runtime records one event per executed thunk (a fusion, a dot, a
copy), named as the instruction in the optimized HLO. Each event is joined with its instruction
(and the fused computation it calls) and classified:

    matmul          dense dots and convolutions (the frozen-weight matmuls, with whatever
                    elementwise work XLA fused into them)
    attention       batched dots: q.k^T, weights.v and their transposes in the backward (XLA
                    fuses the softmax into them where the weights are not kept for the backward)
    softmax         the attention's other reductions and divisions (softmax and its gradient)
    layernorm       LayerNorm statistics, normalisation and their gradient
    gelu            the MLP's elementwise work (GELU and its gradient)
    copy            transposes, concatenations, slices, copies (a folded bias add included)
    tail            what runs outside the differentiated function: optimizer, gradient norm,
                    metrics
    other           the rest (bias and residual adds, the loss)

Dots whose metadata carries the `kv_only_prompts` scope (VPT-deep prompts that only serve as keys
and values, `models/vit.py`) are counted apart as `kv_only_prompts`, and every kind is split into
forward and backward (`transpose(` in the op's name stack). Times are sums over steps divided by
the steps, in ms; thunks that run concurrently make the sum exceed the wall time, which is given
too. The large-matmul rate is measured between the profiled steps in the same run, so
`achieved_over_matmul` compares like with like on a loaded machine.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_cost  # noqa: E402  (the benchmarks' shared model table and step builder)

KINDS = ("matmul", "attention", "kv_only_prompts", "softmax", "layernorm", "gelu", "copy", "tail",
         "other")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\(")
_SHAPE = re.compile(r"[a-z]\w*\[([\d,]*)\]")
_COPIES = {"copy", "transpose", "concatenate", "slice", "dynamic-slice", "bitcast", "reshape",
           "dynamic-update-slice", "broadcast", "parameter", "tuple", "get-tuple-element", "pad"}
_MOVES = {"copy", "transpose", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice",
          "pad"}


def parse_hlo(text: str):
  """{computation: [(instruction, opcode, line)]} of an optimized HLO module, and the entry's."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    if line.endswith("{") and not line.startswith(" "):
      words = line.split()
      entry_line = words[0] == "ENTRY"
      cur = words[1 if entry_line else 0].lstrip("%")
      comps[cur] = []
      if entry_line:
        entry = cur
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      comps[cur].append((m.group(1), m.group(3), line))
  return comps, entry


def _called(line: str):
  return re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", line)


def _dims(text: str):
  m = _SHAPE.search(text)
  return [int(d) for d in m.group(1).split(",") if d] if m else []


def dot_flops(line: str, shapes) -> float:
  """2 * output elements * contracted size of one `dot` line (its operands' shapes in `shapes`)."""
  out = _dims(line.split(" = ", 1)[1])
  lhs = re.search(r"dot\(%?([\w.\-]+)", line)
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
  if not lhs or not contracting or lhs.group(1) not in shapes:
    return 0.0
  lhs_dims = shapes[lhs.group(1)]
  k = np.prod([lhs_dims[int(i)] for i in contracting.group(1).split(",") if i])
  return 2.0 * float(np.prod(out)) * float(k)


def classify(opcode: str, line: str, comps, entry_shapes) -> tuple:
  """(kind, 'fwd' or 'bwd', dot FLOPs) of one entry instruction (see the module docstring)."""
  lines = [(opcode, line, entry_shapes) if opcode == "dot" else (opcode, line)]
  todo, seen = list(_called(line)), set()
  while todo:
    c = todo.pop()
    if c in seen or c not in comps:
      continue
    seen.add(c)
    shapes = {n: _dims(ln.split(" = ", 1)[1]) for n, _, ln in comps[c]}
    for _, op, ln in comps[c]:
      lines.append((op, ln, shapes) if op == "dot" else (op, ln))
      todo.extend(_called(ln))
  names = " ".join(n for item in lines for n in re.findall(r'op_name="([^"]*)"', item[1]))
  ops = {item[0] for item in lines}
  dots = [item for item in lines if item[0] in ("dot", "convolution")]
  flops = sum(dot_flops(item[1], item[2]) for item in dots if len(item) == 3)
  dirn = "bwd" if "transpose(" in names else "fwd"
  if "kv_only_prompts" in names:
    kind = "kv_only_prompts"
  elif dots:
    batched = any(re.search(r"lhs_batch_dims=\{\d", item[1]) for item in dots)
    kind = "attention" if batched else "matmul"
  elif names and "jvp(" not in names:
    kind = "tail"
  elif ops & _MOVES and ops <= _COPIES | {"fusion", "add", "multiply"}:
    kind = "copy"  # layout changes (head-major transposes, key concatenation), bias folded in
  elif "MultiHeadDotProductAttention" in names and ops & {"exponential", "reduce", "divide"}:
    kind = "softmax"
  elif "LayerNorm" in names or "encoder_norm" in names:
    kind = "layernorm"
  elif "MlpBlock" in names and "Dense_1" not in names:
    kind = "gelu"
  elif ops <= _COPIES | {"fusion"}:
    kind = "copy"
  else:
    kind = "other"  # bias and residual adds, the loss
  return kind, dirn, flops


def thunk_events(trace_dir: str):
  """{name: [durations in us]} of the thunk events of the trace (XLA:CPU names them as the HLO
  instruction they execute)."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  out = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(("$", "end: ")):
      out[e["name"]].append(e.get("dur", 0.0))
  return out


def profile(compiled, args, n_steps: int, donate: bool) -> dict:
  """Per-kind time of one execution of `compiled(*args)` (each thunk's fastest of `n_steps`
  runs: the least disturbed by other processes), its dot FLOPs, and the wall times."""
  comps, entry = parse_hlo(compiled.as_text())
  shapes = {n: _dims(ln.split(" = ", 1)[1]) for n, _, ln in comps[entry]}
  kinds = {n: classify(op, ln, comps, shapes) for n, op, ln in comps[entry]}
  out = compiled(*args)
  jax.block_until_ready(out)
  walls = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      for _ in range(n_steps):
        if donate:
          args = (out[0],) + tuple(args[1:])
        t = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        walls.append(time.perf_counter() - t)
    events = thunk_events(d)
  by_kind = collections.defaultdict(lambda: [0.0, 0.0])
  slowest = []
  for name, durs in events.items():
    if name not in kinds:
      continue
    kind, dirn, flops = kinds[name]
    ms = min(durs) / 1e3
    by_kind[f"{kind}/{dirn}"][0] += ms
    by_kind[f"{kind}/{dirn}"][1] += flops
    slowest.append((ms, name, kind, dirn))
  table = {}
  for k, (ms, flops) in sorted(by_kind.items(), key=lambda kv: -kv[1][0]):
    table[k] = {"ms": round(ms, 2), "gflops": round(flops / 1e9, 2)}
    if flops:
      table[k]["gflops_per_s"] = round(flops / ms / 1e6, 1)
  return {"kinds": table, "thunk_sum_ms": round(sum(v[0] for v in by_kind.values()), 1),
          "wall_min_ms": round(min(walls) * 1e3, 1),
          "wall_median_ms": round(statistics.median(walls) * 1e3, 1),
          "slowest": [(n, k, d, round(ms, 2)) for ms, n, k, d in sorted(slowest)[::-1]]}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="vit-s16")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--paths", default="fast")
  ap.add_argument("--protocols", default="vpt_deep_p50,linear")
  ap.add_argument("--top", type=int, default=0, help="also list the N slowest instructions")
  args = ap.parse_args()
  arch = step_cost.MODELS[args.model]
  out = {"benchmark": "step_profile", "model": args.model, "batch": args.batch,
         "backend": jax.default_backend(), "runs": {}}
  matmuls = [step_cost.matmul_flops_per_s()]
  for path in args.paths.split(","):
    for p in args.protocols.split(","):
      proto, kw = step_cost.PROTOCOLS[p]
      built = step_cost.build(arch, proto, kw, args.batch, step_cost.PATHS[path])
      step = built["step"]
      r = profile(step, built["step_args"], args.steps, True)
      matmuls.append(step_cost.matmul_flops_per_s())
      flops = step.cost_analysis()["flops"]
      r["step_gflops"] = round(flops / 1e9, 2)
      r["achieved_gflops_per_s"] = round(flops / r["wall_min_ms"] / 1e6, 1)
      r["slowest"] = r["slowest"][:args.top]
      out["runs"][f"{p}/{path}"] = r
  rate = max(matmuls)
  out["matmul_gflops_per_s"] = round(rate / 1e9, 1)
  for r in out["runs"].values():
    r["achieved_over_matmul"] = round(r["achieved_gflops_per_s"] * 1e9 / rate, 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
