"""FGVC with VPT on ViT-B/16 (ImageNet-21k), through tensorflow-datasets.

    python -m vpt_jax.main --config=configs/fgvc.py:cub --workdir=/tmp/fgvc/cub

    python -m vpt_jax.main --config=configs/fgvc.py:nabirds,data.root=/data/nabirds --workdir=...
    python -m vpt_jax.main --config=configs/fgvc.py:cub,json,data.root=/data/CUB_200_2011 ...

Argument: a dataset (cub, nabirds, flowers, dogs, cars), `json` to read VPT's folder layout
(train.json / val.json / test.json under data.root; NABirds always does, it has no tfds builder)
instead of tfds, `final` for the final protocol (accepted for symmetry with vtab.py: the official
FGVC runs train on the 90% train split and report test, as every FGVC config here does),
`e2vpt` for E2VPT's prompts (5 visual + 5 key-value tokens, prompt dropout 0.1), `full` for
full fine-tuning with the official end-to-end optimizer (`common.full`), `paper` for every
official choice at once (`common.paper`: ImageNet mean/std inputs, batch 128, schedule, head
init, dropout), and `key.path=value` overrides.
Preprocessing as the paper: shorter side to 256, random 224 crop and flip for training, central
crop for evaluation. Where a dataset has no validation split, a seeded random 10% of train is held
out. The official per-dataset lr/wd are the SOLVER.BASE_LR / WEIGHT_DECAY of VPT's
configs/prompt/{cub,nabirds,cars,dogs,flowers}.yaml, which train.py uses unscaled at batch 128:
the effective rate at batch 128, so optim.lr takes them as they are (the convention of
configs/common.py): CUB 0.1/0.01, NABirds 0.1/0.01, Cars 1e-3/1e-4, Dogs 1e-3/1e-4, Flowers
1e-3/1e-4. LR_GRID is tune_fgvc.py's grid, per 256 images (x batch_size / 256 here).
"""

import ml_collections

from configs import common

LR_GRID = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1)   # per 256 images (official FGVC prompt grid)
WD_GRID = (0.01, 1e-3, 1e-4, 0.0)
SEEDS = (42, 44, 82, 100, 800)
# The VPT paper's prompt lengths, searched by `python -m vpt_jax.sweep --protocol` (on val200, as
# lr and wd); `--length_grid=50` fixes one.
PROMPT_LENGTH_GRID = (1, 5, 10, 50, 100, 200)
OFFICIAL_BATCH = 128  # VPT configs/base-prompt.yaml DATA.BATCH_SIZE, at which BASE_LR applies

# name: (tfds builder or '', its validation split or 'holdout', classes, official lr, official wd,
#        image folder of the json layout)
DATASETS = {
    "cub": ("caltech_birds2011", "holdout", 200, 0.1, 0.01, "images"),
    "nabirds": ("", "holdout", 555, 0.1, 0.01, "images"),
    "flowers": ("oxford_flowers102", "validation", 102, 1e-3, 1e-4, ""),
    "dogs": ("stanford_dogs", "holdout", 120, 1e-3, 1e-4, "Images"),
    "cars": ("cars196", "holdout", 196, 1e-3, 1e-4, ""),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  names, overrides = common.split_arg(arg or "cub")
  ds = [n for n in names if n not in ("final", "json", "e2vpt", "paper", "full")]
  if len(ds) != 1 or ds[0] not in DATASETS:
    raise ValueError(f"configs/fgvc.py argument {arg!r}: expected one of {', '.join(DATASETS)}")
  name, val_split, classes, lr, wd, image_dir = DATASETS[ds[0]]
  c = common.tfds_vit_b16(name, classes, crop="resize_crop")
  c.task, c.group = ds[0], "fgvc"
  c.data.resize_size = 256
  c.data.train_split, c.data.val_split, c.data.test_split = "train", val_split, "test"
  if "json" in names or not name:  # VPT's folders: train.json / val.json / test.json
    c.data.source, c.data.name, c.data.image_dir = "fgvc_json", "", image_dir
    c.data.val_split = "val"  # the json reader cuts a seeded 90/10 itself when val.json is absent
  # `final` is the official FGVC protocol: train on the 90% train split, report test (the same
  # training set as tuning; tfds and json paths alike). Validation stays reported, unused.
  if "paper" in names:
    common.paper(c)
  c.optim.lr = lr * c.batch_size / OFFICIAL_BATCH  # the yaml's rate at its batch (128): unscaled
  c.optim.wd = wd
  if "full" in names:  # full fine-tuning with the official end-to-end optimizer
    common.full(c)
  if "e2vpt" in names:  # E2VPT's FGVC default: 5 visual + 5 key-value tokens, batch 128
    c.prompt.length, c.prompt.kv_length = 5, 5
    c.prompt.dropout = common.E2VPT["dropout"]
  common.apply_arg(c, overrides)
  return c
