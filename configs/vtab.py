"""VTAB-1k with VPT on ViT-B/16 (ImageNet-21k), as the paper runs it.

    python -m vpt_jax.main --config=configs/vtab.py:cifar100 --workdir=/tmp/vtab/cifar100
    python -m vpt_jax.main --config=configs/vtab.py:cifar100,final,optim.lr=0.125 --workdir=...

Argument: a task name, `final` for the final protocol (train on train800val200 = 1000 images,
report test; otherwise train800 with val200 for validation), `folder` to read the widely shared
pre-extracted layout instead of tfds (data.root = the task's folder with images/ and the list files
train800.txt, val200.txt, train800val200.txt, test.txt), `e2vpt` for E2VPT's prompts (10 visual +
5 key-value tokens, prompt dropout 0.1, batch 64 as its command.txt; prune with
`python -m vpt_jax.prune`), `full` for full fine-tuning with the official end-to-end
optimizer (`common.full`), `paper` for every official choice at once (`common.paper`: ImageNet
mean/std inputs, batch, schedule, head init, dropout), and any `key.path=value` overrides.
Tuning protocol of the paper: lr x wd grid on train800/val200 (last-epoch val top-1), then 5 seeds
of the final protocol. LR_GRID below is the official grid quoted per 256 images (tune_vtab.py
scales it by BATCH_SIZE / 256); here optim.lr is the rate used at batch_size (the convention of
configs/common.py), so a grid value x is x * batch_size / 256 (x 0.5 at 128, x 0.25 at 64).

Data via tensorflow-datasets (prepared beforehand: `tfds build NAME`; sun397, resisc45 and
diabetic_retinopathy need manual downloads). The 19 tasks, their builders, split arithmetic and
label transforms are one table: `vpt_jax.data.vtab.TASKS`.

Backbone flags (VPT Table 4): `mae` (MAE ViT-B/16) or `moco` (MoCo v3 ViT-B/16 linear-eval file),
e.g. `configs/vtab.py:cifar100,mae`. They read the PyTorch files (zoo names in BACKBONES) with
ImageNet mean/std inputs, as those were trained and as the official code feeds them; `lr_grid(arg)`
gives the official grid for the flag and protocol (`linear_mae` adds three small rates).
`swin` (Swin-B 22k, VPT Table 2: prompts in every window, pooled with the patches as the official
code), `convnext` (ConvNeXt-B 22k) and `resnet` (ResNet-50 1k; VPT Table 5: the prompt is a
learnable border of `prompt.length` pixels, `prompt.location=pad`, 5 = the official NUM_TOKENS
default; ConvNets tune over the official `prompt_resnet` grid) read their PyTorch files the same
way; `vpt_jax.tuning.families` says which options apply to which family.
"""

import ml_collections

from configs import common
from vpt_jax.data.vtab import TASKS

LR_GRID = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)   # per 256 images (official)
WD_GRID = (0.01, 1e-3, 1e-4, 0.0)
SEEDS = (42, 44, 82, 100, 800)                            # the final runs' seeds (official)
# The VPT paper's prompt lengths, searched by `python -m vpt_jax.sweep --protocol` (on val200, as
# lr and wd); `--length_grid=50` fixes one.
PROMPT_LENGTH_GRID = (1, 5, 10, 50, 100, 200)
# Official `get_lrwd_range` grids of the other backbones (per 256 images).
LINEAR_MAE_LR_GRID = LR_GRID + (0.025, 0.005, 0.0025)      # 'linear_mae': linear on MAE / MoCo
PROMPT_RESNET_LR_GRID = (5, 2.5, 1, 0.5, 0.25, 0.1, 0.05, 0.025, 0.01)   # ConvNets, pad prompts
BACKBONES = {"mae": "mae-vit-b16", "moco": "mocov3-vit-b16",   # flag -> zoo name (PyTorch file)
             "swin": "swin-b-22k", "convnext": "convnext-b-22k", "resnet": "resnet50-1k"}
CONVNETS = ("convnext", "resnet")
CONVNET_PAD = 5   # pad width in pixels: the official MODEL.PROMPT.NUM_TOKENS default
# Full fine-tuning excludes biases and norm parameters from weight decay (common.full); these are
# the norm scales of Swin (norm, norm1, norm2) and the ConvNets (norm, stem_norm, bn1, ...).
OTHER_NORM_SCALES = r".*/(norm\d?|\w+_norm|bn\d|downsample_bn)/scale"
FLAGS = ("final", "folder", "e2vpt", "paper", "full") + tuple(BACKBONES)


def lr_grid(arg=None):
  """The official lr grid for this argument's backbone and protocol (`vpt_jax.sweep`)."""
  c = get_config(arg)
  if c.model.checkpoint in (BACKBONES["mae"], BACKBONES["moco"]) and c.protocol == "linear":
    return LINEAR_MAE_LR_GRID
  if c.model.checkpoint in (BACKBONES[n] for n in CONVNETS) and c.protocol == "vpt":
    return PROMPT_RESNET_LR_GRID
  return LR_GRID


def get_config(arg=None) -> ml_collections.ConfigDict:
  names, overrides = common.split_arg(arg or "cifar100")
  task = [n for n in names if n not in FLAGS]
  if len(task) != 1 or task[0] not in TASKS:
    raise ValueError(f"configs/vtab.py argument {arg!r}: expected a task of {', '.join(TASKS)}")
  t = TASKS[task[0]]
  c = common.tfds_vit_b16(t.builder, t.num_classes, crop="resize")  # VTAB: straight to 224
  c.task, c.group = t.name, f"vtab-{t.group}"
  c.data.label_key = t.label_key
  c.data.label_transform = t.label_transform
  c.data.pixel_scale = t.pixel_scale
  if "final" in names:
    c.data.train_split, c.data.val_split = t.train800val200, ""
  else:
    c.data.train_split, c.data.val_split = t.train800, t.val200
  c.data.test_split = t.test
  if "folder" in names:  # the list files name the splits; labels are already transformed
    c.data.update(dict(source="vtab_folder", name="", label_transform="", pixel_scale=1,
                       train_split="train800",
                       val_split="val200", test_split="test"))
    if "final" in names:
      c.data.train_split, c.data.val_split = "train800val200", ""
  if "paper" in names:
    common.paper(c)
  if "e2vpt" in names:  # E2VPT's command.txt for most VTAB tasks: 10 visual + 5 key-value tokens
    c.prompt.length, c.prompt.kv_length = 10, 5
    c.prompt.dropout = common.E2VPT["dropout"]
    c.batch_size = common.E2VPT["vtab_batch_size"]
  c.optim.lr = 1.0 * c.batch_size / 256   # a mid-grid value; tune per task with LR_GRID
  if "full" in names:  # full fine-tuning with the official end-to-end optimizer
    common.full(c)
  backbone = [n for n in names if n in BACKBONES]
  if len(backbone) > 1:
    raise ValueError(f"configs/vtab.py argument {arg!r}: one backbone flag at most")
  if backbone:  # the PyTorch ViTs: no representation layer; ImageNet-normalised inputs
    c.model.checkpoint, c.model.drop_pre_logits = BACKBONES[backbone[0]], False
    c.data.normalization = "imagenet"
    if backbone[0] in ("mae", "swin"):  # VPT's MAE and Swin pool prompts with the patches
      c.prompt.pool = "all"
    if backbone[0] in CONVNETS:  # VPT's pad prompt: a learnable border around the image
      c.prompt.location, c.prompt.deep = "pad", False
      c.prompt.length = CONVNET_PAD if c.prompt.length else 0
    if backbone[0] in ("swin",) + CONVNETS and "full" in names:
      c.optim.wd_exclude = tuple(c.optim.wd_exclude) + (OTHER_NORM_SCALES,)
  common.apply_arg(c, overrides)
  return c
