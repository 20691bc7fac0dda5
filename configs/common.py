"""Defaults shared by every config, and the parser of the `--config=file.py:ARG` argument.

Learning-rate convention (the one statement of it; see README): `optim.lr` is the rate used at
`batch_size`, nothing is rescaled at run time. Official values come in two forms, and every
preset converts them to the official *effective* rate at the official batch size:
- the tuning scripts' grids (tune_vtab.py / tune_fgvc.py, and E2VPT's) are quoted per 256 images
  and scaled by the script (`BASE_LR = lr / 256 * BATCH_SIZE`): grid value x -> x * batch / 256;
- the shipped yaml `SOLVER.BASE_LR` values (VPT configs/prompt/*.yaml) are used as they are by
  train.py at the yaml's batch size (128): they are the effective rate already, kept unchanged.
Inputs are scaled to [-1, 1], the range the ViT checkpoints were trained on; the `paper`
argument of configs/vtab.py and configs/fgvc.py selects every official choice at once
(`paper()` below), including the ImageNet mean/std normalisation the official code used.
"""

import ml_collections

from vpt_jax import prompts
from vpt_jax.data import sources
from vpt_jax.models import heads
from vpt_jax.tuning import optim, pruning


def backbone(checkpoint: str = "vit-b16-i21k") -> ml_collections.ConfigDict:
  """How `vpt_jax.load_pretrained` is called.

  checkpoint: a model-zoo name (`vpt_jax.weights.zoo`), a local .npz/.pth path or a gs:// /
    https:// URL, with an optional ':subtree' suffix (SigLIP files: ':img').
  family: 'auto' (zoo entry, .npz, or the PyTorch file's keys), 'vit', 'mae' or 'moco'
    (`vpt_jax.weights.backbones`).
  num_heads: attention heads of a PyTorch ViT (not stored in its file); 0 = width // 64.
  image_size: run at this resolution (position embeddings are resampled); 0 = the checkpoint's.
  num_classes: the new head's classes; 0 = the dataset's.
  drop_pre_logits: remove the tanh representation layer of ImageNet-21k checkpoints (VPT does).
  dtype: compute dtype of the matmuls, 'float32' or 'bfloat16'.
  head_init: the fresh head: 'zeros' (vit_jax / big_vision, and `load_pretrained`) or 'kaiming'
    (the official VPT head: N(0, 2 / num_classes) weights, bias -log 99; every preset uses it).
  fast_path: compute only what the output needs (exact: same logits and gradients): VPT-deep
    prompts as keys/values only, a class-token-only last layer; False = the straightforward path.
  remat: 'none', 'block' (recompute each block's attention and MLP in the backward pass) or
    'dots' (recompute them but keep the weight-matmul outputs): less memory, same results.
  frozen_dtype: storage of the frozen matmul kernels on the device, 'float32' or 'bfloat16'
    (half their memory; no change of results when dtype='bfloat16', which casts them anyway).
  frozen_sharding: 'replicated' (every device holds the backbone) or 'sharded' (each holds 1/n
    of it, gathered per layer by XLA; the batch stays data-parallel). `vpt_jax.tuning.memory`.
  """
  return ml_collections.ConfigDict(dict(
      checkpoint=checkpoint, image_size=0, num_classes=0, drop_pre_logits=False,
      dtype="float32", fast_path=True, family="auto", num_heads=0, head_init="zeros",
      remat="none", frozen_dtype="float32", frozen_sharding="replicated"))


def get_config() -> ml_collections.ConfigDict:
  """Every option of a run, with the VPT paper's defaults where it has them."""
  c = ml_collections.ConfigDict()
  c.task = ""                            # labels for vpt_jax.report: task name and its group
  c.group = ""                           # vtab-natural | vtab-specialized | vtab-structured | fgvc
  c.model = backbone()
  c.model.drop_pre_logits = True         # VPT reads the class token after the final LayerNorm
  c.model.head_init = "kaiming"          # the official VPT head (zeros: model.head_init=zeros)
  c.prompt = prompts.default_config()    # VPT-deep, p = 50
  c.protocol = "vpt"                     # vpt | linear | full | bias | partial-k | mlp-k | adapter | side
  c.modules = heads.default_config()     # options of mlp-k / adapter / side (README "baselines")
  c.trainable = ()                       # regexes over variable paths; replace the protocol's
  c.prune = pruning.default_config()     # E2VPT pruning (python -m vpt_jax.prune)
  c.optim = optim.default_optim_config()  # SGD momentum 0.9, warmup 10 + cosine to 100 epochs
  c.data = sources.default_config()
  c.batch_size = 128
  c.microbatch_size = 0                  # rows per device per chunk of a step; 0 = automatic
  c.seed = 0
  c.eval_every_epochs = 1                # validation every k epochs (0 = only at the end)
  c.log_every_steps = 10
  c.checkpoint_every_steps = 0           # 0 = at the end of every epoch
  c.keep_checkpoints = 3                 # the last N; the best-on-validation is kept as well
  c.cache_features = "auto"              # frozen prefix computed once per image: auto | true | false
  return c


def tfds_vit_b16(name: str, num_classes: int, crop: str) -> ml_collections.ConfigDict:
  """The paper's setting for a tensorflow-datasets task: ViT-B/16 (i21k) at 224px."""
  c = get_config()
  c.model.checkpoint = "vit-b16-i21k"
  c.model.image_size = 224
  c.data.source = "tfds"
  c.data.name = name
  c.data.num_classes = num_classes
  c.data.crop = crop
  return c


# The official choices `paper` selects (VPT: configs/base-prompt.yaml and src/configs/config.py of
# KMnP/vpt; E2VPT: configs/base-prompt_changed_P_VK.yaml and command.txt of ChengHan111/E2VPT).
PAPER = dict(normalization="imagenet", head_init="kaiming", batch_size=128, epochs=100,
             warmup_epochs=10, dropout=0.0)
E2VPT = dict(dropout=0.1, vtab_batch_size=64, fgvc_batch_size=128)


def paper(c: ml_collections.ConfigDict) -> None:
  """Every official choice the defaults differ in or might: normalisation, batch, schedule, head
  init, prompt dropout (the lr/wd are the config file's, at this batch)."""
  c.data.normalization = PAPER["normalization"]
  c.model.head_init = PAPER["head_init"]
  c.batch_size = PAPER["batch_size"]
  c.optim.epochs, c.optim.warmup_epochs = PAPER["epochs"], PAPER["warmup_epochs"]
  c.prompt.dropout = PAPER["dropout"]


# Full fine-tuning as the official end-to-end runs (KMnP/vpt configs/base-finetune.yaml and
# src/solver/optimizer.py): AdamW, eps 1e-6, weight decay 0.01 (hard-coded there whenever
# WEIGHT_DECAY > 0) on every leaf but biases and LayerNorm parameters; batch 384, 5 warmup epochs.
FULL_WD_EXCLUDE = (r".*/bias", r".*(LayerNorm_\d+|encoder_norm)/scale")
FULL_LR_GRID = (1e-3, 1e-4, 5e-4, 5e-3)  # tune_*.py 'finetune' grid, per 256 images


def full(c: ml_collections.ConfigDict) -> None:
  """The `full` preset: every backbone weight trains with the official end-to-end optimizer."""
  c.protocol = "full"
  c.prompt.length, c.prompt.kv_length = 0, 0
  c.batch_size = 384
  c.optim.update(dict(name="adamw", eps=1e-6, wd=0.01, wd_exclude=FULL_WD_EXCLUDE,
                      warmup_epochs=5, epochs=100))
  c.optim.lr = 1e-3 * c.batch_size / 256


def _parse_value(text: str, like):
  if isinstance(like, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected a boolean, got {text!r}")
    return text.lower() in ("true", "1")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  return text


def apply_arg(config: ml_collections.ConfigDict, tokens) -> None:
  """Applies 'key.path=value' tokens (typed like the existing value) to the config."""
  for tok in tokens:
    key, _, value = tok.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for k in parents:
      if k not in node or not isinstance(node[k], ml_collections.ConfigDict):
        raise ValueError(f"config argument {tok!r}: unknown option {key!r}")
      node = node[k]
    if leaf not in node:
      raise ValueError(f"config argument {tok!r}: unknown option {key!r}")
    try:
      node[leaf] = _parse_value(value, node[leaf])
    except (TypeError, ValueError) as e:
      raise ValueError(f"config argument {tok!r}: option {key!r} takes a "
                       f"{type(node[leaf]).__name__} like {node[leaf]!r}, not {value!r} ({e})"
                       ) from e


def split_arg(arg):
  """'task,final,optim.lr=0.5' -> (['task', 'final'], ['optim.lr=0.5'])."""
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  return [t for t in tokens if "=" not in t], [t for t in tokens if "=" in t]
