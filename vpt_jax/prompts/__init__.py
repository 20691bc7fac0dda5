"""Prompt methods as hook providers: VPT (`vpt`), E2VPT masks (`e2vpt`), the shared `plan`.

`from vpt_jax import prompts` gives the usual entry points (`prompts.attach`, ...).
"""

from vpt_jax.prompts.e2vpt import init_masks, load_masks, mask_digest, read_masks
from vpt_jax.prompts.plan import PromptPlan, prompted_layers
from vpt_jax.prompts.vpt import (LOCATIONS, PIXEL_LOCATIONS, POOLS, VPT, attach, check_config,
                                 default_config, init_from_array, init_prompts, kv_only_layers,
                                 load_init)

__all__ = ["LOCATIONS", "PIXEL_LOCATIONS", "POOLS", "PromptPlan", "VPT", "attach", "check_config",
           "default_config", "init_from_array", "init_masks", "init_prompts", "kv_only_layers",
           "load_init", "load_masks", "mask_digest", "prompted_layers", "read_masks"]
