"""vpt_jax: visual prompt tuning of frozen, pretrained Vision Transformers in JAX/Flax.

The door most users open first:

    model, variables = vpt_jax.load_pretrained("vit-b16-i21k", num_classes=100,
                                               drop_pre_logits=True)
    logits = model.apply(variables, images)   # NHWC float32 in [-1, 1]

`load_pretrained` also reads the MAE / MoCo v3 PyTorch files (`family='auto'` tells them apart).
`load_tuned(workdir)` gives a tuned run (unpacks as `model, variables`); `attach` plugs VPT
prompts into a model.
"""

from vpt_jax.models.hooks import EncoderHooks, Hooks, LayerInput
from vpt_jax.models.vit import VisionTransformer
from vpt_jax.prompts.vpt import attach
from vpt_jax.tuning.workdir import Tuned, load_tuned
from vpt_jax.weights import zoo
from vpt_jax.weights.download import CheckpointError
from vpt_jax.weights.backbones import load_pretrained   # .npz ViTs, and MAE / MoCo .pth files
from vpt_jax.weights.npz import inspect

__version__ = "0.1.0"
__all__ = ["CheckpointError", "EncoderHooks", "Hooks", "LayerInput", "Tuned",
           "VisionTransformer", "attach", "inspect", "load_pretrained", "load_tuned", "zoo"]
