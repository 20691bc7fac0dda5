"""Model definitions (no training or data code here)."""

from vpt_jax.models.vit import EncoderHooks, VisionTransformer

__all__ = ["EncoderHooks", "VisionTransformer"]
