"""Offline demo: the project's own tiny ViT, transferred to scikit-learn's handwritten digits.

    python -m vpt_jax.sweep --config=configs/demo.py --workdir=/tmp/vpt_demo   # all three arms
    python -m vpt_jax.main --config=configs/demo.py:vpt-deep --workdir=/tmp/vpt_demo/vpt-deep

The backbone `demo-vit` ships with the package in the vit_jax .npz format; it was pretrained by
tools/pretrain_demo_backbone.py on a procedural shapes task (a different task from digits). The
digits are split like VTAB-1k: 800 train + 200 validation, and the other 797 images for test.
Argument: an arm name (vpt-deep, vpt-shallow, linear, or a baseline of BASELINE_ARMS), optionally
`final` (train on all 1000, report test) and ',key=value' overrides. `python -m vpt_jax.sweep --protocol` runs the paper's
tuning protocol with LR_GRID x WD_GRID and SEEDS below.
"""

import ml_collections

from configs import common

# lr chosen on val200 from {0.5, 1.0} (ties to the smaller, as the official tuning scripts do).
ARMS = {
    "vpt-deep": dict(protocol="vpt", length=8, deep=True, lr=0.5),
    "vpt-shallow": dict(protocol="vpt", length=8, deep=False, lr=0.5),
    "linear": dict(protocol="linear", length=0, deep=False, lr=1.0),
}
# The paper's other baselines (Table 1), not in the default sweep (which stays ~3 minutes); lr not
# tuned (full 0.05 and partial-1 0.1 were checked stable; 0.5+ diverges for backbone weights):
# `get_sweep(baselines=True)` or `python -m vpt_jax.sweep --config=configs/demo.py --arm=adapter`.
BASELINE_ARMS = {
    "full": dict(protocol="full", length=0, deep=False, lr=0.05),
    "partial-1": dict(protocol="partial-1", length=0, deep=False, lr=0.1),
    "mlp-2": dict(protocol="mlp-2", length=0, deep=False, lr=0.1),
    "bias": dict(protocol="bias", length=0, deep=False, lr=0.1),
    "adapter": dict(protocol="adapter", length=0, deep=False, lr=0.1),
    "side": dict(protocol="side", length=0, deep=False, lr=0.1),
}
ARMS.update(BASELINE_ARMS)


LR_GRID = (1.0, 2.0)       # per 256 images, like the official grid (x batch_size / 256 here)
WD_GRID = (1e-4, 0.0)
SEEDS = (0, 1, 2)


def get_sweep(baselines: bool = False):
  """The arms `vpt_jax.sweep` runs for this config: the three VPT/linear arms, or every arm."""
  return list(ARMS) if baselines else [a for a in ARMS if a not in BASELINE_ARMS]


def get_config(arg=None) -> ml_collections.ConfigDict:
  names, overrides = common.split_arg(arg or "vpt-deep")
  arms = [n for n in names if n != "final"]
  if len(arms) != 1 or arms[0] not in ARMS:
    raise ValueError(f"configs/demo.py argument {arg!r}: expected one of {', '.join(ARMS)}")
  arm = ARMS[arms[0]]
  c = common.get_config()
  c.task, c.group = "digits", "demo"
  c.model.checkpoint = "demo-vit"
  c.model.drop_pre_logits = False
  c.protocol = arm["protocol"]
  c.prompt.length = arm["length"]
  c.prompt.deep = arm["deep"]
  c.data.source = "digits"
  c.data.train_split, c.data.val_split, c.data.test_split = "train800", "val200", "test"
  if "final" in names:
    c.data.train_split, c.data.val_split = "train800val200", ""
  c.batch_size = 64
  c.optim.lr = arm["lr"]
  c.optim.wd = 1e-4
  c.optim.epochs = 30
  c.optim.warmup_epochs = 3
  c.eval_every_epochs = 5
  c.log_every_steps = 60
  common.apply_arg(c, overrides)
  return c
