"""The package's imports keep one direction (README "Layout"): no cycles, no upward imports.

The rule, per top-level part of vpt_jax (a part may import itself and what it lists):

    commands (main, sweep, prune, predict, report, plots) -> tuning, serving, analysis, ...
    serving, analysis -> tuning -> prompts, tasks -> models -> utils
    weights -> models (parameter trees) ; data -> utils only (no model)

Parsed from the source (AST), so it needs no import and sees deferred imports too.
"""

import ast
import os
import re

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "vpt_jax")
COMMANDS = {"main", "sweep", "prune", "predict", "report", "plots"}
_BELOW_TUNING = {"prompts", "tasks", "models", "weights", "data", "utils"}
ALLOWED = {
    "utils": set(),
    "models": {"utils"},
    "weights": {"models", "utils"},
    "data": {"utils"},
    "prompts": {"models", "utils"},
    "tasks": {"models", "data", "utils"},
    "tuning": _BELOW_TUNING,
    "serving": {"tuning"} | _BELOW_TUNING,
    "analysis": {"tuning"} | _BELOW_TUNING,
    "commands": {"tuning", "serving", "analysis"} | _BELOW_TUNING,
    "facade": {"tuning", "serving", "analysis"} | _BELOW_TUNING,   # vpt_jax/__init__.py
}
# Deferred (in-function) imports of our own modules, each for a heavy optional dependency.
DEFERRED_OK = {("vpt_jax.tuning.workdir", "vpt_jax.data.pipeline")}   # TensorFlow


def read_sources(root: str = PACKAGE) -> dict:
  """{module name: source} of every .py file under `root` (the vpt_jax package)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(d, f), os.path.dirname(root))[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        with open(os.path.join(d, f)) as fh:
          out[".".join(rel)] = fh.read()
  return out


def part(module: str) -> str:
  """The layering part of a module name."""
  names = module.split(".")
  if len(names) == 1:
    return "facade"
  top = names[1]
  return "commands" if len(names) == 2 and top in COMMANDS else top


def imports(sources: dict):
  """(importer, imported module, deferred?) for every import of one of `sources`' modules."""
  for mod, src in sources.items():
    tree = ast.parse(src)
    deferred = {id(n) for f in ast.walk(tree)
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                for n in ast.walk(f)}
    for node in ast.walk(tree):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        # `from pkg import name` imports pkg.name when that is a module, else pkg itself (then
        # `name` must be defined there: a missing module would otherwise pass unnoticed).
        for a in node.names:
          sub = f"{node.module}.{a.name}"
          if sub in sources:
            targets.append(sub)
          elif node.module in sources and not re.search(rf"\b{a.name}\b", sources[node.module]):
            targets.append(sub)
          else:
            targets.append(node.module)
      for t in targets:
        if t == "vpt_jax" or t.startswith("vpt_jax."):
          yield mod, t, id(node) in deferred


def problems(sources: dict) -> list:
  """Every broken rule: unknown modules, upward imports, deferred imports, cycles."""
  out, graph = [], {m: set() for m in sources}
  for mod, target, deferred in imports(sources):
    if target not in sources:
      out.append(f"{mod} imports {target}, which does not exist in this tree")
      continue
    a, b = part(mod), part(target)
    if a != b and b not in ALLOWED[a]:
      out.append(f"upward import: {mod} ({a}) imports {target} ({b})")
    if deferred and (mod, target) not in DEFERRED_OK:
      out.append(f"deferred import: {mod} imports {target} inside a function")
    if not deferred and target != mod:
      graph[mod].add(target)
  out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
  return out


def cycles(graph: dict) -> list:
  """One cycle per strongly connected component of more than one module (Tarjan)."""
  index, low, stack, on, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        found.append(sorted(comp) + [sorted(comp)[0]])

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_package_keeps_its_layering():
  sources = read_sources()
  assert {"vpt_jax.models.vit", "vpt_jax.tuning.loop", "vpt_jax.main"} <= set(sources)
  assert problems(sources) == []


def test_a_synthetic_cycle_is_caught():
  sources = {"vpt_jax.tuning.a": "from vpt_jax.tuning import b\nx = 1\n",
             "vpt_jax.tuning.b": "import vpt_jax.tuning.c\n",
             "vpt_jax.tuning.c": "from vpt_jax.tuning.a import x\n"}
  found = problems(sources)
  assert found == ["import cycle: vpt_jax.tuning.a -> vpt_jax.tuning.b -> vpt_jax.tuning.c -> "
                   "vpt_jax.tuning.a"]


@pytest.mark.parametrize("importer, source, match", [
    ("vpt_jax.models.x", "from vpt_jax.tuning import loop\n", "upward import"),
    ("vpt_jax.data.x", "from vpt_jax.models import vit\n", "upward import"),
    ("vpt_jax.prompts.x", "from vpt_jax import serving\n", "upward import"),
    ("vpt_jax.tuning.x", "def f():\n  from vpt_jax.models import vit\n", "deferred import"),
    ("vpt_jax.tuning.x", "from vpt_jax import train\n", "does not exist"),
    ("vpt_jax.tuning.x", "from vpt_jax.tuning import steps\n", "does not exist"),
])
def test_synthetic_violations_are_caught(importer, source, match):
  sources = {importer: source, "vpt_jax.tuning.loop": "def run(): pass\n", "vpt_jax.models.vit": "",
             "vpt_jax.serving": "", "vpt_jax": "from vpt_jax.tuning.loop import run\n",
             "vpt_jax.tuning": ""}
  found = problems(sources)
  assert len(found) == 1 and match in found[0], found
