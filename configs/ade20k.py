"""ADE20K semantic segmentation with a SETR-PUP head: the VPT paper's Table 3.

    python -m vpt_jax.main --config=configs/ade20k.py:vpt-deep --workdir=/tmp/ade20k/vpt-deep
    python -m vpt_jax.main --config=configs/ade20k.py:bias,paper,data.source=ade20k_folder,\\
        data.root=/data/ADEChallengeData2016,data.train_split=training,data.test_split=validation \\
        --workdir=/tmp/ade20k/bias
    python -m vpt_jax.sweep --config=configs/ade20k.py --workdir=/tmp/ade20k   # every protocol

Argument: a protocol (full, head, bias, vpt-deep, vpt+bias, e2vpt), optionally `paper` (the
paper's schedule, below; without it the same with 16k iterations, a tenth, for a first look),
optionally `demo` (the offline shapes task on the shipped demo backbone, `configs/seg_demo.py`)
and ',key=value' overrides.

The paper's setting (VPT Sec. 4.3 / SETR's ADE20K config): ViT-L/16 ImageNet-21k at 512x512,
160k iterations of batch 16, SGD lr 0.001 momentum 0.9 weight decay 0, poly decay (power 0.9) to
1e-4, heads at 10x lr. The prompt length is not stated in the paper's write-up available here:
VPT-deep uses p = 50, the project's default, which gives 14.4M tuned parameters with the heads
(13.1M), near the ~15M the paper reports for VPT (vs 64M for Bias); `prompt.length=...` changes
it. E2VPT has no Table-3 entry: e2vpt adds 10 key-value prompts per layer. Test: sliding window 512 / stride 341 at scale (2048, 512), multi-scale
(0.5..1.75) + flip.
"""

import ml_collections

from configs import common
from vpt_jax.data import seg_sources
from vpt_jax.tuning import seg_loop

# protocol -> (seg.protocol, prompt length, key-value prompt length)
ARMS = {
    "full": ("full", 0, 0),
    "head": ("head", 0, 0),
    "bias": ("bias", 0, 0),
    "vpt-deep": ("vpt", 50, 0),
    "vpt+bias": ("vpt+bias", 50, 0),
    "e2vpt": ("e2vpt", 50, 10),
}


def get_sweep():
  return ["full", "head", "bias", "vpt-deep", "vpt+bias"]


def base(arm: str) -> ml_collections.ConfigDict:
  """Everything but the backbone and the data: the protocol's prompts and trainable rule."""
  if arm not in ARMS:
    raise ValueError(f"segmentation arm {arm!r}: expected one of {', '.join(ARMS)}")
  protocol, length, kv = ARMS[arm]
  c = common.get_config()
  c.seg = seg_loop.default_config()
  c.seg.protocol = protocol
  c.data = seg_sources.default_config()
  c.prompt.length, c.prompt.deep, c.prompt.kv_length = length, True, kv
  c.model.drop_pre_logits = True
  c.cache_features = "false"
  return c


def get_config(arg=None) -> ml_collections.ConfigDict:
  names, overrides = common.split_arg(arg or "vpt-deep")
  arms = [n for n in names if n not in ("paper", "demo")]
  if len(arms) != 1 or arms[0] not in ARMS:
    raise ValueError(f"configs/ade20k.py argument {arg!r}: expected one of {', '.join(ARMS)} "
                     "(plus optionally 'paper' or 'demo')")
  if "demo" in names:
    from configs import seg_demo  # pylint: disable=g-import-not-at-top
    return seg_demo.get_config(",".join([arms[0]] + overrides))
  c = base(arms[0])
  c.task, c.group = "ade20k", "segmentation"
  c.model.checkpoint = "vit-l16-i21k"
  c.model.image_size = 512
  c.data.source = "ade20k_tfds"
  c.data.train_split, c.data.test_split = "train", "test"
  c.batch_size = 16
  c.seg.iterations = 160_000 if "paper" in names else 16_000
  c.seg.checkpoint_every = 4000 if "paper" in names else 2000
  c.log_every_steps = 50
  common.apply_arg(c, overrides)
  return c
