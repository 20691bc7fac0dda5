"""vpt_jax: visual prompt tuning of frozen, pretrained Vision Transformers in JAX/Flax.

The door most users open first:

    model, variables = vpt_jax.load_pretrained("vit-b16-i21k", num_classes=100,
                                               drop_pre_logits=True)
    logits = model.apply(variables, images)   # NHWC float32 in [-1, 1]
"""

from vpt_jax.checkpoints import CheckpointError, inspect, load_pretrained
from vpt_jax.models.vit import EncoderHooks, VisionTransformer


def load_tuned(workdir: str, *, which: str = "best"):
  """(model, variables) of a tuned run: its public backbone plus its saved trainable leaves."""
  from vpt_jax import checkpointing  # pylint: disable=g-import-not-at-top; pulls in orbax
  return checkpointing.load_tuned(workdir, which=which)

__version__ = "0.1.0"
__all__ = ["CheckpointError", "EncoderHooks", "VisionTransformer", "inspect", "load_pretrained",
           "load_tuned"]
