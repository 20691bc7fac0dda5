"""VTAB-1k with VPT on ViT-B/16 (ImageNet-21k), as the paper runs it.

    python -m vpt_jax.main --config=configs/vtab.py:cifar100 --workdir=/tmp/vtab/cifar100
    python -m vpt_jax.main --config=configs/vtab.py:cifar100,final,optim.lr=0.125 --workdir=...

Argument: a task name, `final` for the final protocol (train on train800val200 = 1000 images,
report test; otherwise train800 with val200 for validation), and any `key.path=value` overrides.
Tuning protocol of the paper: lr x wd grid on train800/val200 (last-epoch val top-1), then 5 seeds
of the final protocol. LR_GRID below is the official grid quoted per 256 images; here optim.lr is
the rate used at batch_size, so use grid_value * batch_size / 256 (x 0.5 at the default 128).

Data via tensorflow-datasets (prepared beforehand: `tfds build NAME`; some need manual
downloads). Task facts (builder versions, split slices) follow the VPT code's VTAB-1k tables.
The structured tasks whose labels are derived (clevr count/distance, kitti distance, dsprites
location/orientation binning) need label transforms that come with the full VTAB task table.
"""

import ml_collections

from configs import common

LR_GRID = (50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05)   # per 256 images (official)
WD_GRID = (0.01, 1e-3, 1e-4, 0.0)
SEEDS = (42, 44, 82, 100, 800)                            # the final runs' seeds (official)

# task: (tfds builder, train800, val200, test, num_classes, label key)
TASKS = {
    "caltech101": ("caltech101:3.*.*", "train[:800]", "train[2754:2954]", "test", 102, "label"),
    "cifar100": ("cifar100:3.*.*", "train[:800]", "train[45000:45200]", "test", 100, "label"),
    "dtd": ("dtd:3.*.*", "train[:800]", "validation[:200]", "test", 47, "label"),
    "oxford_flowers102": ("oxford_flowers102:2.*.*", "train[:800]", "validation[:200]", "test",
                          102, "label"),
    "oxford_iiit_pet": ("oxford_iiit_pet:3.*.*", "train[:800]", "train[2944:3144]", "test", 37,
                        "label"),
    "svhn": ("svhn_cropped:3.*.*", "train[:800]", "train[65931:66131]", "test", 10, "label"),
    "sun397": ("sun397/tfds:4.*.*", "train[:800]", "validation[:200]", "test", 397, "label"),
    "patch_camelyon": ("patch_camelyon:2.*.*", "train[:800]", "validation[:200]", "test", 2,
                       "label"),
    "eurosat": ("eurosat/rgb:2.*.*", "train[:800]", "train[16200:16400]", "train[21600:]", 10,
                "label"),
    "resisc45": ("resisc45:3.*.*", "train[:800]", "train[18900:19100]", "train[25200:]", 45,
                 "label"),
    "diabetic_retinopathy": ("diabetic_retinopathy_detection/btgraham-300:3.*.*", "train[:800]",
                             "validation[:200]", "test", 5, "label"),
    "dmlab": ("dmlab:2.0.1", "train[:800]", "validation[:200]", "test", 6, "label"),
    "smallnorb_azimuth": ("smallnorb:2.*.*", "train[:800]", "test[:200]", "test[50%:]", 18,
                          "label_azimuth"),
    "smallnorb_elevation": ("smallnorb:2.*.*", "train[:800]", "test[:200]", "test[50%:]", 9,
                            "label_elevation"),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  names, overrides = common.split_arg(arg or "cifar100")
  task = [n for n in names if n != "final"]
  if len(task) != 1 or task[0] not in TASKS:
    raise ValueError(f"configs/vtab.py argument {arg!r}: expected a task of {', '.join(TASKS)}")
  name, train800, val200, test, classes, label_key = TASKS[task[0]]
  c = common.tfds_vit_b16(name, classes, crop="resize")  # VTAB: straight to 224, no augmentation
  c.data.label_key = label_key
  if "final" in names:
    c.data.train_split, c.data.val_split = f"{train800}+{val200}", ""
  else:
    c.data.train_split, c.data.val_split = train800, val200
  c.data.test_split = test
  c.optim.lr = 1.0 * c.batch_size / 256   # a mid-grid value; tune per task with LR_GRID
  common.apply_arg(c, overrides)
  return c
