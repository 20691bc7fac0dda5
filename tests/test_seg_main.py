"""Segmentation through the trainer: configs, `python -m vpt_jax.main`, results.json, resume, the
Table-3 table and the picture (tiny random ViT on the shapes masks; a few iterations)."""

import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
import forked_cli
from configs import ade20k, seg_demo
from vpt_jax.analysis import report, seg_plots
from vpt_jax.data import seg_sources
from vpt_jax.tasks import seg_inference
from vpt_jax.tuning import loop, rules, seg_loop

TINY = ("model.checkpoint=tiny-random,seg.iterations=4,seg.checkpoint_every=2,batch_size=4,"
        "data.num_train=16,data.num_test=3,seg.channels=8,log_every_steps=2,keep_checkpoints=3,"
        "seg.lr=0.05")


def test_every_argument_loads():
  for arm in ade20k.ARMS:
    c = ade20k.get_config(arm)
    assert c.seg.iterations == 16_000 and c.model.checkpoint == "vit-l16-i21k"
    p = ade20k.get_config(f"{arm},paper")
    assert (p.seg.iterations, p.batch_size, p.model.image_size) == (160_000, 16, 512)
    assert (p.seg.lr, p.seg.momentum, p.seg.wd, p.seg.power, p.seg.end_lr,
            p.seg.head_lr_mult) == (1e-3, 0.9, 0.0, 0.9, 1e-4, 10.0)
    assert (p.seg.stride, p.data.crop, tuple(p.data.scale)) == (341, 512, (2048, 512))
    assert p.data.source == "ade20k_tfds" and p.model.drop_pre_logits
    d = ade20k.get_config(f"{arm},demo")
    assert d.to_dict() == seg_demo.get_config(arm).to_dict() and d.data.source == "shapes"
  assert ade20k.get_config("vpt-deep").prompt.length == 50
  assert ade20k.get_config("e2vpt").prompt.kv_length == 10
  assert ade20k.get_config("head").prompt.length == 0
  assert ade20k.get_config("bias,paper,seg.lr=0.01").seg.lr == 0.01
  for bad in ("linear", "vpt-deep,bias", ""):
    if bad:
      with pytest.raises(ValueError, match="argument"):
        ade20k.get_config(bad)
  with pytest.raises(ValueError, match="data.source='nope'"):
    seg_sources.check(seg_demo.get_config("head,data.source=nope").data)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
  """One CLI run (vpt_jax.main) of 4 iterations, VPT-deep on the tiny random ViT."""
  wd = tmp_path_factory.mktemp("seg") / "a"
  cmd = [sys.executable, "-m", "vpt_jax.main",
         f"--config=configs/seg_demo.py:vpt-deep,{TINY}", f"--workdir={wd}"]
  p = forked_cli.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  return wd


def test_main_writes_results_with_miou(run_a):
  with open(run_a / "results.json") as f:
    r = json.load(f)
  assert r["task_type"] == "segmentation" and r["protocol"] == "vpt" and r["steps"] == 4
  n_cls = len(r["IoU_ss"])
  assert n_cls == seg_sources.num_classes(seg_demo.get_config("head").data) == 15
  # mIoU and aAcc recomputed here, in numpy, from the restored model's predictions.
  tuned = seg_loop.load_tuned(str(run_a))
  predict = seg_inference.make_predict_fn(tuned.segmenter, tuned.backbone_vars, tuned.head_vars)
  inter, gt, pr = np.zeros(n_cls), np.zeros(n_cls), np.zeros(n_cls)
  for ex in seg_sources.eval_examples(tuned.config.data, image_size=32):
    pred = np.asarray(predict(ex["image"][None]))[0].argmax(-1)
    for c in range(n_cls):
      inter[c] += np.sum((pred == c) & (ex["label"] == c))
      gt[c] += np.sum(ex["label"] == c)
      pr[c] += np.sum(pred == c)
  union = gt + pr - inter
  iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
  np.testing.assert_allclose(r["mIoU_ss"], np.nanmean(iou), atol=1e-6)
  np.testing.assert_allclose(r["aAcc_ss"], inter.sum() / gt.sum(), atol=1e-6)
  assert [v is None for v in r["IoU_ss"]] == list(np.isnan(iou))
  assert 0.0 <= r["mIoU_ms"] <= 1.0 and r["images_ss"] == r["images_ms"] == 3
  # Parameter count as the paper's: trainable backbone leaves (prompts) + heads.
  prompts = rules.count(tuned.backbone_vars["prompts"])
  assert r["trainable_params"] == prompts + rules.count(tuned.head_vars["params"])
  assert r["head_params"] == rules.count(tuned.head_vars["params"])
  assert prompts == 2 * 8 * 64  # 2 layers x p = 8 x width


def test_resume_is_bit_identical(run_a, tmp_path):
  """Delete the last checkpoint and the results: the rerun resumes at step 2 and ends with the
  same trainable leaves and BatchNorm statistics."""
  wd = tmp_path / "b"
  shutil.copytree(run_a, wd)
  shutil.rmtree(wd / "checkpoints" / "last" / "4")
  os.remove(wd / "results.json")
  r = loop.train_and_evaluate(seg_demo.get_config(f"vpt-deep,{TINY}"), str(wd))
  with open(run_a / "results.json") as f:
    assert r["mIoU_ss"] == json.load(f)["mIoU_ss"]
  a, b = seg_loop.load_tuned(str(run_a)), seg_loop.load_tuned(str(wd))
  for x, y in ((a.backbone_vars["prompts"], b.backbone_vars["prompts"]),
               (a.head_vars, b.head_vars)):
    jax.tree.map(np.testing.assert_array_equal, x, y)
  stats = jax.tree.leaves(a.head_vars["batch_stats"])
  assert stats and any(np.abs(np.asarray(s)).sum() > 0 for s in stats)


def test_table_has_table3_columns(run_a):
  with open(run_a / "results.json") as f:
    r = json.load(f)
  text = seg_loop.table([{"arm": "vpt-deep", **r}])
  assert "mIoU (ss)" in text and "mIoU (ms)" in text
  assert f"{100 * r['mIoU_ss']:.1f}" in text and f"{r['trainable_params']:,}" in text


def test_seg_plot_writes_a_png(run_a, tmp_path):
  out = seg_plots.seg_figure(str(run_a), str(tmp_path / "seg.png"), num_images=2)
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with Image.open(out) as im:
    assert im.size[0] > 100 and im.size[1] > 50


def test_report_shows_table3_for_segmentation_runs(run_a):

  with open(run_a / "results.json") as f:
    r = json.load(f)
  md = report.tables([report.load_record(str(run_a))])["markdown"]
  assert "mIoU (ss)" in md and "| VPT-deep |" in md
  assert f"{100 * r['mIoU_ss']:.2f}" in md and f"{100 * r['mIoU_ms']:.2f}" in md
  assert f"{r['trainable_params'] / 1e6:.3f}" in md
