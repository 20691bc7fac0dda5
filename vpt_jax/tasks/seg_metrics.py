"""Segmentation metrics from an accumulated confusion matrix: mIoU, pixel accuracy, per-class IoU.

As mmseg's `IoUMetric` (mmseg/evaluation/metrics/iou_metric.py): per class c, over the whole
evaluation set, IoU_c = |pred=c and gt=c| / |pred=c or gt=c| over non-ignored pixels; a class with
an empty union (absent from both the labels and the predictions) has IoU NaN and is left out of the
mean (nanmean). A class that is predicted but never labelled has IoU 0 and counts. aAcc is the
fraction of non-ignored pixels predicted right; mAcc the nanmean of per-class recall (NaN for a
class absent from the labels).

The matrix is summed over images (not per-image IoUs averaged), so the order and the batching of
the evaluation do not change the result.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from vpt_jax.tasks.segmentation import IGNORE_INDEX

Array = jax.Array


def confusion_matrix(pred: Array, labels: Array, num_classes: int, *,
                     ignore_index: int = IGNORE_INDEX) -> Array:
  """(num_classes, num_classes) int32 counts, rows = ground truth, columns = prediction.

  Pixels labelled `ignore_index` are skipped; so are labels outside 0..num_classes-1 (they can
  only be ignore values: any other is a data error that the loader reports). Works under jit.
  """
  if pred.shape != labels.shape:
    raise ValueError(f"prediction {tuple(pred.shape)} and labels {tuple(labels.shape)} differ")
  labels = labels.astype(jnp.int32).reshape(-1)
  pred = pred.astype(jnp.int32).reshape(-1)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + jnp.clip(pred, 0, num_classes - 1), 0)
  counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(valid.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


def summarize(confusion: np.ndarray | Array) -> Dict[str, object]:
  """{'mIoU', 'aAcc', 'mAcc', 'IoU' (per class, NaN = absent from labels and predictions),
  'Acc' (per class recall)} from an accumulated confusion matrix (rows gt, columns prediction)."""
  m = np.asarray(confusion, np.float64)
  if m.ndim != 2 or m.shape[0] != m.shape[1]:
    raise ValueError(f"a confusion matrix is square, got shape {m.shape}")
  inter = np.diag(m)
  gt, pred = m.sum(axis=1), m.sum(axis=0)
  union = gt + pred - inter
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, inter / union, np.nan)
    acc = np.where(gt > 0, inter / gt, np.nan)
  total = m.sum()
  nanmean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
  return {"mIoU": nanmean(iou), "mAcc": nanmean(acc),
          "aAcc": float(inter.sum() / total) if total else float("nan"),
          "IoU": iou, "Acc": acc}
