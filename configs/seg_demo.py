"""Offline segmentation demo: SETR-PUP heads on the shipped demo backbone, procedural shapes.

    python -m vpt_jax.sweep --config=configs/seg_demo.py --workdir=/tmp/seg_demo   # the table
    python -m vpt_jax.main --config=configs/seg_demo.py:vpt-deep --workdir=/tmp/seg_demo/vpt
    python -m vpt_jax.plots seg --workdir=/tmp/seg_demo/vpt-deep --out=seg.png

Each 32x32 image holds one shape (`shapes.make_shape_masks`, fresh seeds: never the pretraining
images); 15 classes: background + the 14 shape classes, every pixel labelled. Arms as
configs/ade20k.py (full, head, bias, vpt-deep, vpt+bias, e2vpt); 2000 training images, batch 32,
SGD + poly as SETR with a larger lr for this small model.
"""

import ml_collections

from configs import ade20k, common


def get_sweep():
  return ["head", "bias", "vpt-deep"]


def get_config(arg=None) -> ml_collections.ConfigDict:
  names, overrides = common.split_arg(arg or "vpt-deep")
  if len(names) != 1 or names[0] not in ade20k.ARMS:
    raise ValueError(f"configs/seg_demo.py argument {arg!r}: expected one of "
                     f"{', '.join(ade20k.ARMS)}")
  c = ade20k.base(names[0])
  c.task, c.group = "shapes", "segmentation-demo"
  c.model.checkpoint = "demo-vit"
  c.model.drop_pre_logits = False
  if c.prompt.length:
    c.prompt.length = 8
  if c.prompt.kv_length:
    c.prompt.kv_length = 4
  c.data.source = "shapes"
  c.data.num_train, c.data.num_test = 2000, 300
  c.batch_size = 32
  c.seg.iterations = 300
  c.seg.lr = 0.01
  c.seg.end_lr = 1e-4
  c.seg.channels = 64
  c.seg.stride = 32
  c.seg.ms_scales = (0.75, 1.0, 1.25)
  c.seg.checkpoint_every = 100
  c.log_every_steps = 50
  common.apply_arg(c, overrides)
  return c
