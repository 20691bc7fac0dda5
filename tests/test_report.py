"""The tuning protocol in one command (grid -> select -> seeded finals), resumable; the report."""

import csv
import io
import json
import os

import pytest

from conftest import ROOT
from vpt_jax import report as report_cmd
from vpt_jax.analysis import report
from vpt_jax.tuning import loop, sweeps
from configs import demo

DEMO = os.path.join(ROOT, "configs", "demo.py")
FAST = ("model.checkpoint=tiny-random,optim.epochs=1,optim.warmup_epochs=0,eval_every_epochs=1,"
        "log_every_steps=12,task=digits,group=vtab-natural,data.test_split=test[:200]")


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
  wd = str(tmp_path_factory.mktemp("protocol"))
  summary = sweeps.run_protocol(DEMO, f"vpt-deep,{FAST}", wd, lr_grid=["1.0", "4.0"],
                               wd_grid=["0.0", "0.001"], seeds=["0", "1"])
  return wd, summary


def test_grid_selection_and_final_runs(protocol):
  wd, s = protocol
  assert len(s["grid"]) == 4 and {(g["lr"], g["wd"]) for g in s["grid"]} == {
      (1.0, 0.0), (1.0, 0.001), (4.0, 0.0), (4.0, 0.001)}
  best_val = max(g["val_top1"] for g in s["grid"])
  smallest_lr = min(g["lr"] for g in s["grid"] if g["val_top1"] == best_val)
  assert s["best"]["val_top1"] == best_val and s["best"]["lr"] == smallest_lr
  for g in s["grid"]:  # grid points train on train800 and score on val200 at lr * batch / 256
    with open(os.path.join(wd, "grid", f"lr{g['lr']:g}_wd{g['wd']:g}", "results.json")) as f:
      r = json.load(f)
    assert r["config"]["data"]["train_split"] == "train800"
    assert r["config"]["optim"]["lr"] == pytest.approx(g["lr"] * 64 / 256)
    assert r["val_top1"] == g["val_top1"]
  tops = []
  for f in s["final"]:
    with open(os.path.join(wd, "final", f"seed{f['seed']}", "results.json")) as fh:
      r = json.load(fh)
    cfg = r["config"]
    assert cfg["data"]["train_split"] == "train800val200" and cfg["data"]["val_split"] == ""
    assert cfg["seed"] == f["seed"] and cfg["optim"]["wd"] == s["best"]["wd"]
    tops.append(r["test_top1"])
  assert s["test_top1_mean"] == pytest.approx(sum(tops) / 2)
  with open(os.path.join(wd, "protocol.json")) as f:
    assert json.load(f)["test_top1_mean"] == s["test_top1_mean"]


def test_protocol_is_resumable_and_never_reruns_a_finished_point(protocol, capsys,
                                                                 monkeypatch):
  wd, s = protocol
  monkeypatch.setattr(loop, "train_and_evaluate",
                      lambda *a, **k: pytest.fail("a finished run was started again"))
  again = sweeps.run_protocol(DEMO, f"vpt-deep,{FAST}", wd, lr_grid=["1.0", "4.0"],
                             wd_grid=["0.0", "0.001"], seeds=["0", "1"])
  assert capsys.readouterr().out.count("finished earlier, not rerun") == 6
  assert again["test_top1_mean"] == s["test_top1_mean"]


def test_report_in_the_papers_layout(protocol, tmp_path):
  wd, s = protocol
  singles = []
  for task in ("digits", "digits-b"):
    d = str(tmp_path / task)
    c = demo.get_config(f"linear,{FAST},task={task}")
    singles.append(loop.train_and_evaluate(c, d))
  out = report.tables([report.load_record(wd), report.load_record(str(tmp_path / "digits")),
                       report.load_record(str(tmp_path / "digits-b"))])
  md = out["markdown"].splitlines()
  vpt = next(l for l in md if l.startswith("| VPT-deep | "))
  lin = next(l for l in md if l.startswith("| Linear | "))
  assert f"| {100 * s['test_top1_mean']:.2f} |" in vpt
  mean = 100 * (singles[0]["test_top1"] + singles[1]["test_top1"]) / 2
  assert f"| {mean:.2f} |" in lin and lin.endswith("| - | - | - |")
  b, t = singles[0]["backbone_params"], singles[0]["trainable_params"]
  assert f"{(b + 2 * t) / b:.2f}x (2 tasks)" in lin
  rows = list(csv.DictReader(io.StringIO(out["csv"])))
  assert {(r["method"], r["task"]) for r in rows} == {
      ("VPT-deep", "digits"), ("Linear", "digits"), ("Linear", "digits-b")}
  assert next(r for r in rows if r["method"] == "VPT-deep")["seeds"] == "2"
  with pytest.raises(FileNotFoundError, match="neither protocol.json nor results.json"):
    report.load_record(str(tmp_path))


def test_report_command_writes_markdown_and_csv(protocol, tmp_path, capsys):
  wd, s = protocol
  out_csv = str(tmp_path / "table.csv")
  report_cmd.main(["report", wd, f"--csv={out_csv}"])
  printed = capsys.readouterr().out
  assert "| VPT-deep |" in printed and "VTAB Natural" in printed
  with open(out_csv) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 1
  assert float(rows[0]["test_top1"]) == pytest.approx(s["test_top1_mean"], abs=1e-6)


def test_one_row_per_method_and_backbone():
  """Records of one method on two backbones are not averaged together."""
  def rec(backbone, task, top1):
    return {"dir": f"/x/{backbone}/{task}", "task": task, "group": "vtab-natural",
            "method": "VPT-deep", "backbone": backbone, "test_top1": top1, "seeds": 1,
            "trainable_params": 10, "backbone_params": 1000, "shared_backbone": True}
  out = report.tables([rec("mae-vit-b16", "a", 0.5), rec("mae-vit-b16", "b", 0.7),
                       rec("vit-b16-i21k", "a", 0.9)])
  md = out["markdown"].splitlines()
  assert "| VPT-deep | mae-vit-b16 | 1.02x (2 tasks) | 60.00 | - | - | - |" in md
  assert "| VPT-deep | vit-b16-i21k | 1.01x (1 tasks) | 90.00 | - | - | - |" in md
  assert "| VPT-deep | vit-b16-i21k | 90.0 | - |" in md
  rows = list(csv.DictReader(io.StringIO(out["csv"])))
  assert [r["backbone"] for r in rows] == ["mae-vit-b16", "mae-vit-b16", "vit-b16-i21k"]
  assert report.backbone_name({"model": {"checkpoint": "/data/mae_vit.pth"}}) == "mae_vit.pth"


def test_methods_are_named_by_all_that_distinguishes_them_and_duplicates_are_refused():
  def cfg(**prompt):
    return {"protocol": "vpt", "prompt": {"deep": True, "kv_length": 0, "mask_file": ""} | prompt}
  names = [report.method_name(cfg()), report.method_name(cfg(deep=False)),
           report.method_name(cfg(kv_length=5)),
           report.method_name(cfg(kv_length=5, mask_file="/r/masks.npz")),
           report.method_name(cfg(mask_file="/r/masks.npz"))]
  assert names == ["VPT-deep", "VPT-shallow", "E2VPT", "E2VPT (pruned)", "VPT-deep (pruned)"]
  assert len(set(names)) == len(names)
  rec = lambda d, method: {"dir": d, "task": "dtd", "group": "vtab-natural", "method": method,
                           "test_top1": 0.5, "seeds": 1, "trainable_params": 10,
                           "backbone_params": 1000, "shared_backbone": True}
  out = report.tables([rec("/runs/vpt", "VPT-deep"), rec("/runs/e2vpt", "E2VPT")])
  assert "| E2VPT |" in out["markdown"] and "| VPT-deep |" in out["markdown"]
  with pytest.raises(ValueError, match="method 'VPT-deep' on task 'dtd': /runs/a and /runs/b"):
    report.tables([rec("/runs/a", "VPT-deep"), rec("/runs/b", "VPT-deep")])


def test_prompt_length_is_searched_on_val200_like_lr_and_wd(tmp_path, monkeypatch, capsys):
  """A stand-in trainer scores (p, lr) on validation: p = 5 at lr 1.0 is best; the final runs use
  it. Every (p, lr, wd) runs once in its own directory."""
  seen = []

  def fake(config, workdir):
    seen.append((workdir, config.prompt.length, config.optim.lr, config.data.val_split))
    val = 0.9 if (config.prompt.length, config.optim.lr) == (5, 0.25) else 0.5
    return {"val_top1": val if config.data.val_split else None, "test_top1": 0.7}
  monkeypatch.setattr(loop, "train_and_evaluate", fake)
  s = sweeps.run_protocol(DEMO, "vpt-deep", str(tmp_path), lr_grid=["1.0", "4.0"],
                          wd_grid=["0.0"], seeds=["0", "1"], length_grid=["1", "5", "10"])
  assert s["best"] == {"lr": 1.0, "wd": 0.0, "val_top1": 0.9, "length": 5}
  grid = [x for x in seen if x[3]]
  assert {(os.path.basename(w), p) for w, p, _, _ in grid} == {
      (f"p{p}_lr{lr}_wd0", p) for p in (1, 5, 10) for lr in (1, 4)}
  finals = [x for x in seen if not x[3]]
  assert [(p, lr) for _, p, lr, _ in finals] == [(5, 0.25), (5, 0.25)]
  assert s["length_grid"] == [1, 5, 10]


def test_key_value_prompt_length_is_searched_with_the_visual_length(tmp_path, monkeypatch):
  """E2VPT tunes both lengths: (p, k) = (5, 2) is best on validation and the finals use both."""
  seen = []

  def fake(config, workdir):
    seen.append((os.path.basename(workdir), config.prompt.length, config.prompt.kv_length,
                 config.data.val_split))
    best = (config.prompt.length, config.prompt.kv_length) == (5, 2)
    return {"val_top1": (0.9 if best else 0.5) if config.data.val_split else None,
            "test_top1": 0.7}
  monkeypatch.setattr(loop, "train_and_evaluate", fake)
  s = sweeps.run_protocol(DEMO, "vpt-deep", str(tmp_path), lr_grid=["1.0"], wd_grid=["0.0"],
                          seeds=["0"], length_grid=["1", "5"], kv_length_grid=["0", "2"])
  assert s["best"] == {"lr": 1.0, "wd": 0.0, "val_top1": 0.9, "length": 5, "kv_length": 2}
  assert sorted(x[0] for x in seen if x[3]) == sorted(
      f"p{p}_kv{k}_lr1_wd0" for p in (1, 5) for k in (0, 2))
  assert [(p, k) for _, p, k, v in seen if not v] == [(5, 2)]
  assert s["kv_length_grid"] == [0, 2]
