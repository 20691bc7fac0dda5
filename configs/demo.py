"""Offline demo: the tiny checkpoint shipped with the package, no download.

    python -m vpt_jax.predict --config=configs/demo.py
    python -m vpt_jax.predict --config=configs/demo.py --config.images=a.jpg,b.png
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  del arg
  config = ml_collections.ConfigDict()
  config.model = common.backbone("tiny-random")
  config.predict = ml_collections.ConfigDict(dict(
      images="",       # comma-separated image files; empty = a few generated test patterns
      top_k=3,
      batch_size=32,
  ))
  return config
