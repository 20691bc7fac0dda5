"""A segmentation run (the paper's Table 3, SETR-PUP): what `loop.train_and_evaluate` does for a
config with a `seg` section.

    python -m vpt_jax.main --config=configs/ade20k.py:vpt-deep --workdir=/tmp/ade20k/vpt

The backbone is built by `build.build` exactly as for classification (checkpoint, prompts, E2VPT
key-value prompts, fingerprint), then its classifier is removed (`segmentation.dense_backbone`)
and SETR-PUP heads read its block outputs. What trains: the protocol's backbone leaves
(`seg_steps.backbone_patterns`) and the heads; SGD with poly decay, heads at 10x lr
(`optim.sgd_poly`), iteration-based as mmseg. Checkpoints hold the trainable tree, the optimizer,
the heads' BatchNorm statistics, step and RNG; a rerun resumes. results.json: single-scale and
multi-scale + flip mIoU, aAcc, mAcc and per-class IoU from an accumulated confusion matrix.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Dict, List

import jax
import ml_collections
import numpy as np

from vpt_jax import utils
from vpt_jax.data import seg_sources
from vpt_jax.tasks import seg_inference, seg_metrics
from vpt_jax.tasks import segmentation as seg
from vpt_jax.tuning import build, optim, rules, seg_steps, steps, workdir as workdir_lib
from vpt_jax.tuning.metrics import MetricWriter, Progress

Tree = Dict[str, Any]


def default_config() -> ml_collections.ConfigDict:
  """The `seg` section: what makes a config a segmentation run.

  protocol: full | head | bias | vpt (= vpt-deep) | vpt+bias | e2vpt (the paper's Table 3; it sets
    the run's `protocol`). iterations, lr, head_lr_mult, momentum, wd, end_lr, power: SGD with poly
    decay (mmseg's schedule_160k with SETR's lr 0.001 and heads x10).
  channels: the heads' width (SETR: 256). aux: train with the auxiliary heads (SETR-PUP: yes).
  stride: sliding-window stride (crop = the model's image size; SETR ADE20K: 512 / 341).
  ms_scales, ms_flip: the multi-scale evaluation (mmseg's aug_test); empty = single scale only.
  loss_average: 'all' (mmseg: divide by every pixel) or 'valid'.
  checkpoint_every: save every k iterations (and at the end).
  """
  return ml_collections.ConfigDict(dict(
      protocol="vpt", iterations=160_000, lr=1e-3, head_lr_mult=10.0, momentum=0.9, wd=0.0,
      end_lr=1e-4, power=0.9, channels=256, aux=True, stride=341,
      ms_scales=seg_inference.MS_RATIOS, ms_flip=True, loss_average="all",
      checkpoint_every=4000, eval_batch=1))


def head_specs(depth: int, patch: int, cfg: ml_collections.ConfigDict):
  """SETR-PUP's heads (`segmentation.setr_pup_specs`) sized to upsample by the patch size:
  decode log2(p) x [conv, 2x], auxiliary log4(p) x [conv, 4x] (p = 16: mmseg's 4 and 2)."""
  k = int(round(math.log2(patch)))
  if 2 ** k != patch or k % 2:
    raise ValueError(f"SETR-PUP upsamples by powers of 4; patch size {patch} is not one")
  decode, aux = seg.setr_pup_specs(depth)
  decode = dataclasses.replace(decode, channels=cfg.channels, num_convs=k, up_scale=2)
  aux = tuple(dataclasses.replace(a, channels=cfg.channels, num_convs=k // 2, up_scale=4)
              for a in aux) if cfg.aux else ()
  return decode, aux


def prepare(config: ml_collections.ConfigDict):
  """(config, built (dense backbone), segmenter, head variables, backbone mask)."""
  config = ml_collections.ConfigDict(config.to_dict())
  s = config.seg
  seg_sources.check(config.data)
  if s.iterations <= 0:
    raise ValueError(f"config seg.iterations={s.iterations} must be > 0")
  if s.loss_average not in seg.AVERAGES:
    raise ValueError(f"config seg.loss_average={s.loss_average!r}: one of {seg.AVERAGES}")
  patterns = seg_steps.backbone_patterns(s.protocol)   # checks the name
  config.protocol = seg_steps.PROTOCOLS[s.protocol]
  config.model.num_classes = seg_sources.num_classes(config.data)
  built = build.build(config)
  model, variables = seg.dense_backbone(built.model, built.variables)
  mask = rules.label(variables, patterns)
  built = dataclasses.replace(built, model=model, variables=variables, patterns=patterns,
                              mask=mask)
  decode, aux = head_specs(model.depth, model.patch_size[0], s)
  segmenter = seg.Segmenter(model, seg.SETRPUP(config.model.num_classes, decode, aux))
  head_vars = segmenter.init_head(jax.random.PRNGKey(config.seed + 7))
  return config, built, segmenter, head_vars


def fingerprint(built: build.Built, segmenter: seg.Segmenter) -> Dict[str, Any]:
  """The backbone's fingerprint (`build.Built.fingerprint`) plus the heads' specs."""
  return {**built.fingerprint(), "seg_heads": utils.jsonable(
      [dataclasses.asdict(h) for h in (segmenter.head.decode, *segmenter.head.aux)])}


def param_counts(built: build.Built, head_vars: Tree) -> Dict[str, int]:
  """As the paper counts them: trainable backbone leaves + the heads."""
  trainable, _ = rules.split(built.variables, built.mask)
  heads = rules.count(head_vars["params"])
  backbone = rules.count(built.variables["params"])
  return {"trainable_params": rules.count(trainable) + heads, "head_params": heads,
          "backbone_params": backbone,
          "trainable_percent_of_backbone": 100.0 * (rules.count(trainable) + heads) / backbone}


def evaluate(config, segmenter, backbone_vars, head_vars, image_size: int) -> Dict[str, Any]:
  """{'ss': summary, 'ms': summary} on the test split (sliding window; multi-scale + flip)."""
  predict = seg_inference.make_predict_fn(segmenter, backbone_vars, head_vars)
  s, n_cls = config.seg, config.model.num_classes
  crop = (image_size, image_size)
  stride = (min(s.stride, image_size),) * 2
  out = {}
  modes = {"ss": ((1.0,), False)}
  if len(s.ms_scales):
    modes["ms"] = (tuple(s.ms_scales), bool(s.ms_flip))
  for name, (scales, flip) in modes.items():
    conf, n = seg_inference.evaluate(
        predict, seg_sources.eval_examples(config.data, image_size=image_size), n_cls,
        crop=crop, stride=stride, scales=scales, flip=flip, batch_size=s.eval_batch)
    out[name] = {**seg_metrics.summarize(conf), "images": n}
  return out


def _results(metrics: Dict[str, Any]) -> Dict[str, Any]:
  flat = {}
  for mode, m in metrics.items():
    for k in ("mIoU", "aAcc", "mAcc"):
      flat[f"{k}_{mode}"] = m[k]
    flat[f"IoU_{mode}"] = [None if np.isnan(v) else float(v) for v in m["IoU"]]
    flat[f"images_{mode}"] = m["images"]
  return flat


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains, checkpoints, evaluates; writes results.json and returns its dict."""
  t_start = time.time()
  say = utils.lead_printer()
  config, built, segmenter, head_vars = prepare(config)
  s, total = config.seg, int(config.seg.iterations)
  image_size = built.model.image_size[0]
  replicated, batch_sharding = steps.mesh_shardings()
  tx = optim.sgd_poly(lr=s.lr, head_lr_mult=s.head_lr_mult, momentum=s.momentum,
                      end_lr=s.end_lr, power=s.power, steps=total, weight_decay=s.wd)
  trainable, frozen = rules.split(built.variables, built.mask)
  state = seg_steps.create_train_state({"backbone": trainable, "head": head_vars["params"]},
                                       head_vars["batch_stats"], tx,
                                       jax.random.PRNGKey(config.seed))
  state = jax.device_put(state, replicated)
  ckpt = workdir_lib.Checkpointer(workdir, fingerprint(built, segmenter),
                                  keep=config.keep_checkpoints)
  writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
  try:
    state = workdir_lib.resume(ckpt, state, replicated, workdir, config, say)
    counts = param_counts(built, head_vars)
    say(f"segmentation: {built.model.depth} layers, width {built.model.width}, "
        f"{config.model.num_classes} classes, {image_size}px; protocol {s.protocol}: "
        f"{counts['trainable_params']:,} trainable parameters (heads {counts['head_params']:,}); "
        f"{total} iterations of batch {config.batch_size}")
    step_fn = jax.jit(seg_steps.make_train_step(segmenter, tx, average=s.loss_average),
                      donate_argnums=(0,), in_shardings=(replicated, replicated, batch_sharding),
                      out_shardings=(replicated, replicated))
    frozen = jax.device_put(frozen, replicated)
    start = int(state.step)
    progress = Progress(total, max(seg_sources.steps_per_epoch(config.data, config.batch_size),
                                   1), config.batch_size, start,
                        enabled=jax.process_index() == 0)
    batches = steps.prefetch_to_device(
        seg_sources.train_batches(config.data, batch_size=config.batch_size, seed=config.seed,
                                  image_size=image_size, start_step=start), batch_sharding)
    for step in range(start, total):
      state, metrics = step_fn(state, frozen, next(batches))
      t = step + 1
      if t == start + 1:
        progress.restart_clock(t)
      if t % config.log_every_steps == 0 or t == total:
        host = jax.device_get(metrics)
        if not np.isfinite(host["loss"]):
          raise FloatingPointError(f"loss is {host['loss']} at iteration {t}; stopping (the last "
                                   f"checkpoint is in {workdir}/checkpoints/last). Lower seg.lr.")
        progress.line(t, {k: float(v) for k, v in host.items()})
        writer.write(t, {f"train/{k}": float(v) for k, v in host.items()})
      if t % max(s.checkpoint_every, 1) == 0 or t == total:
        ckpt.save(state)
    ckpt.wait()
    backbone_vars = rules.merge(state.trainable["backbone"], frozen)
    head = {"params": state.trainable["head"], "batch_stats": state.batch_stats}
    metrics = evaluate(config, segmenter, backbone_vars, head, image_size)
    results = {"task_type": "segmentation", "protocol": s.protocol, **_results(metrics),
               **counts, "steps": total, "devices": jax.device_count(),
               "wall_time_s": time.time() - t_start, "config": config.to_dict()}
    writer.write(total, {f"test/mIoU_{m}": metrics[m]["mIoU"] for m in metrics})
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
      say("results: " + ", ".join(f"{k} {100 * results[k]:.2f}" for k in
                                  ("mIoU_ss", "mIoU_ms", "aAcc_ss") if k in results))
    return results
  finally:
    writer.close()
    ckpt.close()


def table(rows: List[Dict[str, Any]]) -> str:
  """Table 3's layout: protocol, trainable parameters (heads included), mIoU single/multi-scale."""
  head = ["arm", "protocol", "trainable params", "mIoU (ss)", "mIoU (ms)", "aAcc (ss)",
          "time (s)"]
  fmt = lambda r, k: "-" if r.get(k) is None else f"{100 * r[k]:.1f}"  # noqa: E731
  lines = [[r.get("arm", r["protocol"]), r["protocol"], f"{r['trainable_params']:,}",
            fmt(r, "mIoU_ss"), fmt(r, "mIoU_ms"), fmt(r, "aAcc_ss"), f"{r['wall_time_s']:.0f}"]
           for r in rows]
  widths = [max(len(x) for x in col) for col in zip(head, *lines)]
  out = [" | ".join(h.ljust(w) for h, w in zip(head, widths)), "-|-".join("-" * w for w in widths)]
  out += [" | ".join(x.ljust(w) for x, w in zip(line, widths)) for line in lines]
  return "\n".join(out)


@dataclasses.dataclass
class TunedSegmenter:
  config: ml_collections.ConfigDict
  segmenter: seg.Segmenter
  backbone_vars: Tree
  head_vars: Tree


def load_tuned(workdir: str) -> TunedSegmenter:
  """A finished (or checkpointed) segmentation run: the public backbone + its saved leaves."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a vpt_jax workdir (run vpt_jax.main first)")
  with open(path) as f:  # as saved: the classification defaults of `read_config` do not apply
    config = ml_collections.ConfigDict(json.load(f))
  if "seg" not in config:
    raise ValueError(f"{workdir} is not a segmentation run (its config has no 'seg' section)")
  config, built, segmenter, head_vars = prepare(config)
  tx = optim.sgd_poly(lr=config.seg.lr, steps=int(config.seg.iterations))
  trainable, frozen = rules.split(built.variables, built.mask)
  state = seg_steps.create_train_state({"backbone": trainable, "head": head_vars["params"]},
                                       head_vars["batch_stats"], tx, jax.random.PRNGKey(0))
  ckpt = workdir_lib.Checkpointer(workdir, fingerprint(built, segmenter),
                                  keep=config.keep_checkpoints)
  try:
    restored = ckpt.restore(state)
  finally:
    ckpt.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir}/checkpoints/last holds no checkpoint")
  return TunedSegmenter(config, segmenter, rules.merge(restored.trainable["backbone"], frozen),
                        {"params": restored.trainable["head"],
                         "batch_stats": restored.batch_stats})
