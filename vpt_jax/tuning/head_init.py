"""The tuned head's initial values: the official VPT head, or zeros (vit_jax / big_vision).

The official VPT head is a torch Linear with `kaiming_normal_(mode='fan_out')` weights
(std = sqrt(2 / num_classes)) and the bias -log((1 - 0.01) / 0.01) = -log 99 of its MLP's
`special_bias` (src/models/mlp.py). A zero head makes every prompt gradient exactly 0 at the first
step (the logits do not depend on the features), so with the warmup's lr 0 at step 0 the prompts
only start learning at step 2; the official head gives them a gradient at once.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import jax
import jax.numpy as jnp

HEAD_INITS = ("kaiming", "zeros")
OFFICIAL_BIAS = -math.log(99.0)


def check(kind: str) -> None:
  if kind not in HEAD_INITS:
    raise ValueError(f"config model.head_init={kind!r}: expected one of {HEAD_INITS}")


def init_head(kind: str, head: Dict[str, Any], rng: jax.Array) -> Dict[str, Any]:
  """{'kernel': (features, classes), 'bias': (classes,)} initialised by `kind`."""
  check(kind)
  kernel, bias = head["kernel"], head["bias"]
  if kind == "zeros":
    return {"kernel": jnp.zeros_like(kernel), "bias": jnp.zeros_like(bias)}
  std = math.sqrt(2.0 / kernel.shape[-1])  # torch fan_out of a (classes, features) weight
  return {"kernel": std * jax.random.normal(rng, kernel.shape, kernel.dtype),
          "bias": jnp.full(bias.shape, OFFICIAL_BIAS, bias.dtype)}
