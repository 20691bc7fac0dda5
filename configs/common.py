"""Defaults shared by every config, and the parser of the `--config=file.py:ARG` argument.

Conventions (see README): `optim.lr` is the learning rate used at `batch_size` (no hidden
scaling); the official VPT tuning scripts quote lr per 256 images, so their grid value x becomes
x * batch_size / 256 here. Inputs are scaled to [-1, 1], the range the ViT checkpoints were
trained on (`data.normalization='imagenet'` reproduces the official VPT code).
"""

import ml_collections

from vpt_jax import prompts
from vpt_jax.data import sources
from vpt_jax.models import heads
from vpt_jax.tuning import optim, pruning


def backbone(checkpoint: str = "vit-b16-i21k") -> ml_collections.ConfigDict:
  """How `vpt_jax.load_pretrained` is called.

  checkpoint: a model-zoo name (`vpt_jax.weights.zoo`), a local .npz path or a gs:// / https:// URL, with
    an optional ':subtree' suffix (SigLIP files: ':img').
  image_size: run at this resolution (position embeddings are resampled); 0 = the checkpoint's.
  num_classes: the new head's classes; 0 = the dataset's.
  drop_pre_logits: remove the tanh representation layer of ImageNet-21k checkpoints (VPT does).
  dtype: compute dtype of the matmuls, 'float32' or 'bfloat16'.
  fast_path: compute only what the output needs (exact: same logits and gradients): VPT-deep
    prompts as keys/values only, a class-token-only last layer; False = the straightforward path.
  """
  return ml_collections.ConfigDict(dict(
      checkpoint=checkpoint, image_size=0, num_classes=0, drop_pre_logits=False,
      dtype="float32", fast_path=True))


def get_config() -> ml_collections.ConfigDict:
  """Every option of a run, with the VPT paper's defaults where it has them."""
  c = ml_collections.ConfigDict()
  c.task = ""                            # labels for vpt_jax.report: task name and its group
  c.group = ""                           # vtab-natural | vtab-specialized | vtab-structured | fgvc
  c.model = backbone()
  c.model.drop_pre_logits = True         # VPT reads the class token after the final LayerNorm
  c.prompt = prompts.default_config()    # VPT-deep, p = 50
  c.protocol = "vpt"                     # vpt | linear | full | bias | partial-k | mlp-k | adapter | side
  c.modules = heads.default_config()     # options of mlp-k / adapter / side (README "baselines")
  c.trainable = ()                       # regexes over variable paths; replace the protocol's
  c.prune = pruning.default_config()     # E2VPT pruning (python -m vpt_jax.prune)
  c.optim = optim.default_optim_config()  # SGD momentum 0.9, warmup 10 + cosine to 100 epochs
  c.data = sources.default_config()
  c.batch_size = 128
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
