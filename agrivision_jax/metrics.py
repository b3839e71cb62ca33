"""Validation metrics: the official Agriculture-Vision confusion matrix and mIoU (the headline
``miou``), and beside it the authors' validation IoU (``miou_authors``).

Official rule (challenge definition): for each valid pixel with prediction ``x = argmax`` over the
classes (ties go to the lowest class index) and label set ``Y`` (``{background}`` when no class is
set): if ``x`` is in ``Y``, ``M[y, y] += 1`` for every ``y`` in ``Y``; otherwise ``M[x, y] += 1``
for every ``y`` in ``Y``. Rows are predictions, columns targets. ``IoU_c = M[c, c] / (row_c +
col_c - M[c, c])`` and the mIoU is the mean over classes, background included. The challenge
averages over all C classes and leaves IoU_c undefined when class c is neither predicted nor
labelled (0 / 0; this does not happen on the full validation or test set, where every class is
labelled). Here such a class has IoU NaN (written as JSON null) and is left out of the mean; the
mIoU is NaN only when no class has a denominator.

The authors' IoU (LAOS-Y/AgriVision, train.py ``val`` and utils.py ``intersectionAndUnion``) is
a multi-label IoU per class: the prediction of class c is ``logit_c > 0`` (their logits are set to
-32768 and their labels to 0 at invalid pixels, so invalid pixels count nowhere), and over the
whole split ``IoU_c = I_c / (U_c + 1e-10)`` with ``I_c = sum(label_c * pred_c)`` and ``U_c =
sum(label_c) + sum(pred_c) - I_c``; ``miou_authors`` is the plain mean over all C classes. Their
loop sums the counts over the batches (``AverageMeter.sum``) and over GPUs (all-reduce), so the
IoU is of the summed counts, not a mean of per-batch IoUs; a class with no prediction and no label
gets 0 (their 1e-10), not NaN, and counts in their mean. Their float sums are exact integer counts
here; their validation loader drops the last incomplete batch of each GPU (``drop_last=True``),
which is not reproduced (every image is counted).

``batch_counts`` runs inside jit on a batch (int32, exact); ``SegmentationMetric`` accumulates the
counts on the host in int64, so a whole validation set (4,431 tiles x 262,144 pixels, each pixel
counted |Y| times) cannot overflow.
"""
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_INT32_LIMIT = 2**31


def _check_shapes(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> None:
  """ValueError unless logits, labels are (B, H, W, C) and valid (B, H, W) with B*H*W < 2**31
  (so that no int32 count of the batch can overflow)."""
  if logits.ndim != 4 or labels.shape != logits.shape or valid.shape != logits.shape[:-1]:
    raise ValueError('expected logits (B, H, W, C), labels (B, H, W, C), valid (B, H, W); got '
                     f'{logits.shape}, {labels.shape}, {valid.shape}')
  if valid.size >= _INT32_LIMIT:
    raise ValueError(f'{valid.size} pixels in one batch could overflow int32 counts; '
                     'split the batch')


def confusion_matrix(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
  """Official confusion matrix of one batch (vectorised, jit-able).

  Args:
    logits: (B, H, W, C) per-class scores; the prediction is their argmax.
    labels: (B, H, W, C) multi-hot targets (set where > 0.5).
    valid: (B, H, W) bool; invalid pixels are not scored.

  Returns:
    (C, C) int32 counts, rows = prediction, columns = target.

  Raises:
    ValueError: on inconsistent shapes, or B*H*W >= 2**31 (an entry could overflow int32).
  """
  _check_shapes(logits, labels, valid)
  batch, num_classes = logits.shape[0], logits.shape[-1]
  prediction = jnp.argmax(logits, axis=-1)
  targets = labels > 0.5
  targets = targets.at[..., 0].set(targets[..., 0] | ~jnp.any(targets, axis=-1))
  hit = jnp.take_along_axis(targets, prediction[..., None], axis=-1)[..., 0]
  # Row of each pixel: its prediction on a miss, the extra row C on a hit (diagonal), none if
  # invalid; an int8 x int8 -> int32 product per image counts every (row, target) pair exactly
  # (per image, so that a batch sharded over devices is never contracted across devices).
  row = jnp.where(valid, jnp.where(hit, num_classes, prediction), num_classes + 1)
  rows = (row[..., None] == jnp.arange(num_classes + 1)).astype(jnp.int8)
  per_image = jnp.einsum('bnr,bnc->brc', rows.reshape(batch, -1, num_classes + 1),
                         targets.astype(jnp.int8).reshape(batch, -1, num_classes),
                         preferred_element_type=jnp.int32)
  counts = jnp.sum(per_image, axis=0)
  return counts[:num_classes] + jnp.diag(counts[num_classes])


def iou_from_confusion(matrix: Any) -> tuple[np.ndarray, float]:
  """Per-class IoU and mIoU of an official confusion matrix (host, float64).

  Args:
    matrix: (C, C) integer counts, rows = prediction, columns = target.

  Returns:
    (per_class_iou (C,) float64 with NaN where a class is neither predicted nor labelled,
     miou: mean of the non-NaN entries, NaN if there are none).
  """
  matrix = np.asarray(matrix, dtype=np.int64)
  if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
    raise ValueError(f'confusion matrix must be (C, C); got shape {matrix.shape}')
  true_positives = np.diag(matrix).astype(np.float64)
  denominator = matrix.sum(axis=1) + matrix.sum(axis=0) - np.diag(matrix)
  present = denominator > 0
  per_class = np.full(matrix.shape[0], np.nan)
  per_class[present] = true_positives[present] / denominator[present]
  miou = float(per_class[present].mean()) if present.any() else float('nan')
  return per_class, miou


class ConfusionMetric:
  """Mergeable official-mIoU metric: an int64 (C, C) confusion matrix on the host.

  Usage: ``update`` (in place) with the (C, C) int32 matrix of each step (or a (..., C, C) stack
  of per-device or per-step matrices), combine with ``merge``; ``compute`` gives
  ``{'miou': float, 'iou/<class name>': float}``.
  """

  def __init__(self, num_classes: int, class_names: Sequence[str]):
    """Empty metric for ``num_classes`` classes named ``class_names`` (in class-index order)."""
    class_names = tuple(str(name) for name in class_names)
    if num_classes < 1 or len(class_names) != num_classes:
      raise ValueError(f'class_names must name the {num_classes} classes; got {class_names}')
    self.class_names = class_names
    self.matrix = np.zeros((num_classes, num_classes), np.int64)

  def update(self, matrix: Any) -> 'ConfusionMetric':
    """Adds (..., C, C) non-negative integer counts (numpy or jax) in int64; returns self."""
    matrix = np.asarray(matrix)
    size = len(self.class_names)
    if matrix.shape[-2:] != (size, size) or not np.issubdtype(matrix.dtype, np.integer):
      raise ValueError(f'expected integer (..., {size}, {size}) counts; got {matrix.dtype} '
                       f'{matrix.shape}')
    if np.any(matrix < 0):
      raise ValueError('confusion counts must be >= 0 (an int32 per-batch matrix overflowed?)')
    self.matrix = self.matrix + matrix.astype(np.int64).reshape(-1, size, size).sum(axis=0)
    return self

  def merge(self, other: 'ConfusionMetric') -> 'ConfusionMetric':
    """New metric with the counts of both (same class names required)."""
    if other.class_names != self.class_names:
      raise ValueError(f'cannot merge metrics over classes {self.class_names} and '
                       f'{other.class_names}')
    return ConfusionMetric(len(self.class_names), self.class_names).update(
        np.stack([self.matrix, other.matrix]))

  def compute(self) -> dict[str, float]:
    """{'miou': float, 'iou/<class name>': float}; NaN for a class never predicted nor labelled."""
    per_class, miou = iou_from_confusion(self.matrix)
    result = {'miou': miou}
    result.update({f'iou/{name}': float(iou) for name, iou in zip(self.class_names, per_class)})
    return result


def authors_counts(logits: jax.Array, labels: jax.Array,
                   valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-class counts of the authors' multi-label IoU for one batch (jit-able).

  Args:
    logits: (B, H, W, C) per-class logits; class c is predicted where ``logit_c > 0``.
    labels: (B, H, W, C) multi-hot targets (set where > 0.5).
    valid: (B, H, W) bool; invalid pixels are counted nowhere.

  Returns:
    (intersection (C,) int32: valid pixels both predicted and labelled c,
     union (C,) int32: valid pixels predicted or labelled c). Each image is reduced on its own
    and the per-image counts are then summed, so a batch split over devices is reduced locally.
  """
  _check_shapes(logits, labels, valid)
  mask = valid[..., None]
  predicted = (logits > 0) & mask
  labelled = (labels > 0.5) & mask
  per_image = lambda x: jnp.sum(x, axis=(1, 2), dtype=jnp.int32)  # (B, C)
  intersection = jnp.sum(per_image(predicted & labelled), axis=0)
  union = jnp.sum(per_image(predicted | labelled), axis=0)
  return intersection, union


def batch_counts(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
  """Every validation count of one batch (jit-able); sum them over batches, then ``compute``.

  Args:
    logits: (B, H, W, C) per-class logits.
    labels: (B, H, W, C) multi-hot targets.
    valid: (B, H, W) bool.

  Returns:
    {'confusion': (C, C) int32 official confusion matrix,
     'intersection': (C,) int32 and 'union': (C,) int32, the authors' IoU counts
     (``authors_counts``)}.
  """
  intersection, union = authors_counts(logits, labels, valid)
  return {'confusion': confusion_matrix(logits, labels, valid), 'intersection': intersection,
          'union': union}


class SegmentationMetric:
  """Host accumulator of ``batch_counts`` (int64); ``compute`` gives every validation metric."""

  def __init__(self, class_names: Sequence[str]):
    """Empty metric over the classes ``class_names`` (in class-index order)."""
    self._confusion = ConfusionMetric(len(class_names), class_names)
    self._intersection = np.zeros(len(class_names), np.int64)
    self._union = np.zeros(len(class_names), np.int64)

  def update(self, counts: dict[str, Any]) -> 'SegmentationMetric':
    """Adds one ``batch_counts`` result (leading axes, e.g. stacked steps, are summed)."""
    self._confusion.update(counts['confusion'])
    size = len(self._union)
    for name in ('intersection', 'union'):
      values = np.asarray(counts[name])
      if values.shape[-1:] != (size,) or not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"expected integer (..., {size}) '{name}' counts; got {values.dtype} "
                         f'{values.shape}')
      if np.any(values < 0):
        raise ValueError(f"'{name}' counts must be >= 0 (an int32 per-batch count overflowed?)")
    self._intersection += np.asarray(counts['intersection'], np.int64).reshape(-1, size).sum(0)
    self._union += np.asarray(counts['union'], np.int64).reshape(-1, size).sum(0)
    return self

  def compute(self) -> dict[str, float]:
    """{'miou', 'iou/<class>'} (official; NaN for a class never predicted nor labelled) and
    {'miou_authors', 'iou_authors/<class>'} (the authors' IoU: 0 for such a class)."""
    result = self._confusion.compute()
    authors = self._intersection / (self._union + 1e-10)
    result['miou_authors'] = float(authors.mean())
    result.update({f'iou_authors/{name}': float(iou)
                   for name, iou in zip(self._confusion.class_names, authors)})
    return result
