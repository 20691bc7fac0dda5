"""A split held in memory, and the padded order of an evaluation pass (shared by every pipeline)."""

from __future__ import annotations

import dataclasses
from typing import Tuple

import numpy as np


@dataclasses.dataclass
class Split:
  """One split in memory: images as uint8 (n, H, W, C) or an object array of encoded bytes."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  @property
  def encoded(self) -> bool:
    return self.images.dtype == object


def eval_order(n: int, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """(index, mask) of one in-order pass over n examples in whole batches: the last batch is padded
  by wrapping around, and the padding rows carry mask 0 so metrics count each example once."""
  padded = -(-n // batch_size) * batch_size
  return np.arange(padded) % n, (np.arange(padded) < n).astype(np.float32)


def train_order(order: np.ndarray, batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """(index, mask) of one training epoch in whole batches: every example once, in `order`, and
  the last batch filled up by wrapping around with mask 0 (the official loader keeps the partial
  last batch; padding + mask keeps one compiled step). ceil(n / batch_size) batches."""
  n = len(order)
  padded = -(-n // batch_size) * batch_size
  return order[np.arange(padded) % n], (np.arange(padded) < n).astype(np.float32)
