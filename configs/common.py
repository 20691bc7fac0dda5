"""Defaults shared by every config: the backbone and how it is loaded."""

import ml_collections


def backbone(checkpoint: str = "vit-b16-i21k") -> ml_collections.ConfigDict:
  """How `vpt_jax.load_pretrained` is called.

  checkpoint: a model-zoo name (`vpt_jax.zoo`), a local .npz path or a gs:// / https:// URL, with
    an optional ':subtree' suffix (SigLIP files: ':img').
  image_size: run at this resolution (position embeddings are resampled); 0 = the checkpoint's.
  num_classes: replace the head by a fresh one with this many classes; 0 = keep the checkpoint's.
  drop_pre_logits: remove the tanh representation layer of ImageNet-21k checkpoints (VPT does).
  dtype: compute dtype of the matmuls, 'float32' or 'bfloat16'.
  """
  return ml_collections.ConfigDict(dict(
      checkpoint=checkpoint, image_size=0, num_classes=0, drop_pre_logits=False,
      dtype="float32"))
