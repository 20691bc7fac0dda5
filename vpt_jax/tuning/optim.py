"""The optimizer of the trainable tree: SGD or AdamW, warmup + cosine schedule, decay mask."""

from __future__ import annotations

import re
from typing import Callable, Dict, Any, Tuple

import flax
import jax
import ml_collections
import optax

Tree = Dict[str, Any]


def default_optim_config() -> ml_collections.ConfigDict:
  """The `optim` section of a config, with the VPT paper's defaults.

  name: 'sgd' (momentum, coupled L2 weight decay as torch.optim.SGD) or 'adamw' (decoupled).
  lr: peak learning rate, as used (no hidden scaling: multiply by batch_size/256 yourself to
    follow the official tuning scripts' convention of quoting lr at batch 256).
  wd: weight decay. wd_exclude: path regexes without weight decay (the official code exempts the
    head bias).
  warmup_epochs, epochs: linear warmup from 0, then cosine decay to 0, per step.
  grad_clip: clip the trainable gradients to this global norm (0 = off).
  resume_with_changes: resume a checkpoint made with other optim settings (refused otherwise).
  """
  return ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.9, wd=1e-4, wd_exclude=("params/head/bias",),
      warmup_epochs=10, epochs=100, grad_clip=0.0, b1=0.9, b2=0.999, eps=1e-8,
      resume_with_changes=False))


def lr_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  if cfg.lr <= 0:
    raise ValueError(f"config optim.lr={cfg.lr} must be > 0")
  if cfg.epochs <= 0 or not 0 <= cfg.warmup_epochs < cfg.epochs:
    raise ValueError(f"config optim.warmup_epochs={cfg.warmup_epochs} must be in "
                     f"[0, optim.epochs={cfg.epochs})")
  total = int(cfg.epochs * steps_per_epoch)
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(warmup, 0), total, 0.0)


def _decay_mask(patterns) -> Callable[[Tree], Tree]:
  compiled = [re.compile(p) for p in patterns]

  def mask(tree: Tree) -> Tree:
    flat = flax.traverse_util.flatten_dict(tree)
    return flax.traverse_util.unflatten_dict(
        {k: not any(c.fullmatch("/".join(k)) for c in compiled) for k in flat})
  return mask


def make_optimizer(cfg: ml_collections.ConfigDict, steps_per_epoch: int,
                   ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax transformation for the trainable tree, and its learning-rate schedule."""
  schedule = lr_schedule(cfg, steps_per_epoch)
  mask = _decay_mask(cfg.wd_exclude)
  if cfg.wd < 0:
    raise ValueError(f"config optim.wd={cfg.wd} must be >= 0")
  if cfg.name == "sgd":
    tx = optax.chain(optax.add_decayed_weights(cfg.wd, mask),
                     optax.sgd(schedule, momentum=cfg.momentum or None))
  elif cfg.name == "adamw":
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.wd, mask=mask)
  else:
    raise ValueError(f"config optim.name={cfg.name!r}: expected 'sgd' or 'adamw'")
  if cfg.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), tx)
  return tx, schedule


def sgd_poly(*, lr: float = 1e-3, head_lr_mult: float = 10.0, momentum: float = 0.9,
             end_lr: float = 1e-4, power: float = 0.9, steps: int = 160_000,
             weight_decay: float = 0.0) -> optax.GradientTransformation:
  """SETR's ADE20K optimiser for trees {'backbone': ..., 'head': ...}: SGD with momentum, lr
  (base - end) * (1 - t / steps)^power + end per group (mmseg PolyLR with eta_min), the heads at
  head_lr_mult x the base lr (mmseg's custom_keys {'head': lr_mult 10}); weight decay 0 in the
  SETR config (L2 added to the gradient, as torch SGD does, when > 0)."""
  if lr <= 0 or steps <= 0:
    raise ValueError(f"sgd_poly: lr={lr} and steps={steps} must be > 0")

  def group(base):
    sched = optax.polynomial_schedule(base, end_lr, power, steps)
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    return optax.chain(*parts, optax.sgd(sched, momentum=momentum or None))
  return optax.multi_transform(
      {"backbone": group(lr), "head": group(lr * head_lr_mult)},
      lambda tree: {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in tree.items()})
