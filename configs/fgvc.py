"""FGVC with VPT on ViT-B/16 (ImageNet-21k), through tensorflow-datasets.

    python -m vpt_jax.main --config=configs/fgvc.py:cub --workdir=/tmp/fgvc/cub

Argument: a dataset (cub, flowers, dogs, cars), `final` to train on train+val and report test,
and `key.path=value` overrides. Preprocessing as the paper: shorter side to 256, random 224 crop
and flip for training, central crop for evaluation. Where tfds has no validation split, the last
10% of train is held out (a fixed slice). The official per-dataset lr/wd (per 256 images, scale by
batch_size/256 here): CUB 0.1/0.01, NABirds 0.1/0.01, Cars 1e-3/1e-4, Dogs 1e-3/1e-4,
Flowers 1e-3/1e-4. NABirds (no tfds builder) needs the image-folder source.
"""

import ml_collections

from configs import common

# name: (tfds builder, train, val, test, classes, official lr, official wd)
DATASETS = {
    "cub": ("caltech_birds2011", "train[:90%]", "train[90%:]", "test", 200, 0.1, 0.01),
    "flowers": ("oxford_flowers102", "train", "validation", "test", 102, 1e-3, 1e-4),
    "dogs": ("stanford_dogs", "train[:90%]", "train[90%:]", "test", 120, 1e-3, 1e-4),
    "cars": ("cars196", "train[:90%]", "train[90%:]", "test", 196, 1e-3, 1e-4),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  names, overrides = common.split_arg(arg or "cub")
  ds = [n for n in names if n != "final"]
  if len(ds) != 1 or ds[0] not in DATASETS:
    raise ValueError(f"configs/fgvc.py argument {arg!r}: expected one of {', '.join(DATASETS)}")
  name, train_split, val_split, test, classes, lr, wd = DATASETS[ds[0]]
  c = common.tfds_vit_b16(name, classes, crop="resize_crop")
  c.data.resize_size = 256
  if "final" in names:
    c.data.train_split = "train+validation" if val_split == "validation" else "train"
    c.data.val_split = ""
  else:
    c.data.train_split, c.data.val_split = train_split, val_split
  c.data.test_split = test
  c.optim.lr = lr * c.batch_size / 256
  c.optim.wd = wd
  common.apply_arg(c, overrides)
  return c
