"""Backbone families (one file each) and the hook interface they offer; no training or data code."""

from vpt_jax.models.hooks import EncoderHooks, Hooks, LayerInput
from vpt_jax.models.vit import VisionTransformer

__all__ = ["EncoderHooks", "Hooks", "LayerInput", "VisionTransformer"]
