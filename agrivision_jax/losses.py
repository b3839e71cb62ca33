"""The paper's segmentation losses: sigmoid BCE, soft Dice, Lovasz hinge and their hybrid.

Every loss takes per-class logits ``(B, H, W, C)`` (any float dtype; computed in float32), multi-hot
``labels (B, H, W, C)`` (0/1, float or integer) and a boolean ``valid (B, H, W)`` (pixels inside
both the boundary map and the mask), and returns a float32 scalar. Invalid pixels have no effect on
any value or gradient, except through the authors' BCE normalisation switch
(``bce(..., over_all_pixels=True)``), which reproduces their training code: invalid logits set to
-32768 and labels to 0, then BCE averaged over every element (invalid elements add exactly 0 to the
sum but count in the denominator).

The hybrid loss (paper, section 3.3) is ``(BCE + l1 * Dice + l2 * Lovasz) / (1 + l1 + l2)``.
``make_loss`` builds the training loss of ``config.loss``: the mean over groups of
``config.loss.group_size`` images of the hybrid loss of each group (the authors' DDP objective
with 16), each device computing its own groups when the groups follow the batch sharding. With
the authors' BCE switch, each group's BCE is its valid-element sum over all of its elements.
"""
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

DICE_EPS = 1e-7
# The mesh axis that splits the batch.
DATA_AXIS = 'data'
# Sort key of invalid pixels: after every finite error in the descending-error order, label 0.
_INVALID_KEY = 0x7FFFFFFE
_SIGN_MASK_COMPLEMENT = 0x7FFFFFFF


def _prepare(logits: jax.Array, labels: jax.Array,
             valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Checks shapes; returns float32 logits, float32 labels and boolean valid."""
  if logits.ndim != 4:
    raise ValueError(f'logits must be (B, H, W, C); got shape {logits.shape}')
  if labels.shape != logits.shape:
    raise ValueError(f'labels must have the logits shape {logits.shape}; got {labels.shape}')
  if valid.shape != logits.shape[:-1]:
    raise ValueError(f'valid must be (B, H, W) = {logits.shape[:-1]}; got {valid.shape}')
  return (logits.astype(jnp.float32), labels.astype(jnp.float32), valid.astype(bool))


def bce(logits: jax.Array, labels: jax.Array, valid: jax.Array, *,
        over_all_pixels: bool = False) -> jax.Array:
  """Sigmoid binary cross-entropy (``torch.nn.BCEWithLogitsLoss``) averaged over valid elements.

  Args:
    logits: (B, H, W, C) per-class logits.
    labels: (B, H, W, C) multi-hot targets in [0, 1].
    valid: (B, H, W) bool; invalid pixels contribute nothing.
    over_all_pixels: the authors' normalisation: divide the valid-element sum by all B*H*W*C
      elements (their invalid elements have logit -32768 and label 0, whose BCE is exactly 0).

  Returns:
    float32 scalar; 0 when no pixel is valid.
  """
  logits, labels, valid = _prepare(logits, labels, valid)
  elements = (jnp.maximum(logits, 0.0) - logits * labels
              + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  total = jnp.sum(jnp.where(valid[..., None], elements, 0.0))
  if over_all_pixels:
    return total / elements.size
  count = jnp.sum(valid, dtype=jnp.int32).astype(jnp.float32) * logits.shape[-1]
  return total / jnp.maximum(count, 1.0)


def dice(logits: jax.Array, labels: jax.Array, valid: jax.Array, *,
         per_class: bool = False) -> jax.Array:
  """Soft Dice loss ``1 - 2 * sum(p * t) / (sum(p) + sum(t) + 1e-7)``, p = sigmoid(logits).

  The authors' form (catalyst ``DiceLoss``): one global Dice over batch, classes and valid pixels.

  Args:
    logits: (B, H, W, C) per-class logits.
    labels: (B, H, W, C) multi-hot targets in [0, 1].
    valid: (B, H, W) bool; sums run over valid pixels only.
    per_class: one Dice per class (sums over batch and valid pixels), averaged over classes.

  Returns:
    float32 scalar (1 when no pixel is valid).
  """
  logits, labels, valid = _prepare(logits, labels, valid)
  mask = valid[..., None].astype(jnp.float32)
  probabilities = jax.nn.sigmoid(logits) * mask
  targets = labels * mask
  axes = (0, 1, 2) if per_class else None
  intersection = jnp.sum(probabilities * targets, axis=axes)
  union = jnp.sum(probabilities, axis=axes) + jnp.sum(targets, axis=axes)
  return 1.0 - jnp.mean(2.0 * intersection / (union + DICE_EPS))


def _sort_keys(errors: jax.Array, positive: jax.Array, valid: jax.Array) -> jax.Array:
  """int32 keys whose ascending order is the descending order of ``errors``.

  The float's bits are mapped to a monotone int32; the least significant bit is replaced by the
  label (so one single-operand integer sort yields errors and labels together, 1 ulp of error
  resolution given up); invalid elements get ``_INVALID_KEY``, after every finite error.
  """
  bits = lax.bitcast_convert_type(-errors, jnp.int32)
  ordered = jnp.where(bits < 0, bits ^ _SIGN_MASK_COMPLEMENT, bits)
  keys = (ordered & ~1) | positive.astype(jnp.int32)
  return jnp.where(valid, keys, _INVALID_KEY)


def _key_errors(keys: jax.Array) -> jax.Array:
  """Inverse of the error part of ``_sort_keys``: float32 errors (label bit kept as 1 ulp)."""
  bits = jnp.where(keys < 0, keys ^ _SIGN_MASK_COMPLEMENT, keys)
  return -lax.bitcast_convert_type(bits, jnp.float32)


def _lovasz_from_sorted(sorted_keys: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Lovasz hinge of rows of sorted keys (..., N) -> (loss (...,), gradient (..., N) sorted).

  At sorted position k with p positives and n negatives among the first k + 1 elements and P
  positives in the row, the Jaccard loss of the prefix is J_k = (p + n) / (P + n); the Lovasz
  gradient g_k = J_k - J_{k-1} is computed in closed form (no cancellation):
  1 / (P + n) at a positive, (P - p) / ((P + n)(P + n - 1)) at a negative (1 when P + n = 1).
  """
  valid = sorted_keys != _INVALID_KEY
  positive = (sorted_keys & 1) == 1
  positives_so_far = jnp.cumsum(positive, axis=-1, dtype=jnp.int32)
  rank = lax.broadcasted_iota(jnp.int32, sorted_keys.shape, sorted_keys.ndim - 1) + 1
  p = positives_so_far.astype(jnp.float32)
  n = (rank - positives_so_far).astype(jnp.float32)
  total_positives = p[..., -1:]
  union = total_positives + n
  gradient_positive = 1.0 / jnp.maximum(union, 1.0)
  negative_denominator = jnp.where(union > 1.0, union * (union - 1.0), 1.0)
  gradient_negative = jnp.where(union > 1.0, (total_positives - p) / negative_denominator, 1.0)
  gradient = jnp.where(valid, jnp.where(positive, gradient_positive, gradient_negative), 0.0)
  hinge = jnp.where(valid, jax.nn.relu(_key_errors(sorted_keys)), 0.0)
  return jnp.sum(hinge * gradient, axis=-1), gradient


@jax.custom_vjp
def _lovasz_rows(errors: jax.Array, positive: jax.Array, valid: jax.Array) -> jax.Array:
  """Binary Lovasz hinge of each row: errors, positive, valid (..., N) -> (...,) float32."""
  keys = _sort_keys(errors, positive, valid)
  return _lovasz_from_sorted(lax.sort(keys, dimension=keys.ndim - 1, is_stable=False))[0]


def _element_gradients(keys: jax.Array, sorted_keys: jax.Array) -> jax.Array:
  """The Lovasz gradient of every element in its original position (..., N) -> (..., N).

  Finds each element's tie group (the run of equal keys, hence equal error and label) in the
  sorted row by one binary search for its start, instead of carrying a permutation through the
  sort (a (key, index) sort is about 4x slower than the single int32 sort on XLA:CPU); the group's
  end is read from a reverse cumulative minimum of the run ends (half the time of a second
  search). With lo elements
  before the group, p of them positive, n = lo - p, m elements in the group and P positives in the
  row, every element of the group gets the mean of the group's sequential gradients (a valid
  subgradient; exactly the sequential gradient when m = 1): 1 / (P + n) for positives (the same
  at every position of a positive group) and, telescoping the negatives' (P - p) / (U (U - 1)),
  (P - p) / ((P + n)(P + n + m)), or 1 / m for the first group when P + n = 0. Invalid
  elements get 0.
  """
  rows = sorted_keys.reshape(-1, sorted_keys.shape[-1])
  queries = keys.reshape(rows.shape)
  lo = jax.vmap(functools.partial(jnp.searchsorted, side='left'))(rows, queries)
  position = lax.broadcasted_iota(jnp.int32, rows.shape, 1)
  run_last = jnp.concatenate([rows[:, 1:] != rows[:, :-1],
                              jnp.ones_like(rows[:, :1], dtype=bool)], axis=-1)
  run_end = lax.cummin(jnp.where(run_last, position + 1, rows.shape[-1]), axis=1, reverse=True)
  hi = jnp.take_along_axis(run_end, lo, axis=-1)
  positive_rows = (rows & 1) == 1
  positives_before = jnp.concatenate(
      [jnp.zeros_like(positive_rows[:, :1], jnp.int32),
       jnp.cumsum(positive_rows, axis=-1, dtype=jnp.int32)], axis=-1)
  p = jnp.take_along_axis(positives_before, lo, axis=-1).astype(jnp.float32)
  total_positives = positives_before[:, -1:].astype(jnp.float32)
  n = lo.astype(jnp.float32) - p
  m = (hi - lo).astype(jnp.float32)
  union = total_positives + n
  gradient_positive = 1.0 / jnp.maximum(union, 1.0)
  gradient_negative = jnp.where(union > 0.0,
                                (total_positives - p) / jnp.maximum(union * (union + m), 1.0),
                                1.0 / m)
  positive = (queries & 1) == 1
  gradient = jnp.where(positive, gradient_positive, gradient_negative)
  return jnp.where(queries != _INVALID_KEY, gradient, 0.0).reshape(keys.shape)


def _lovasz_rows_fwd(errors, positive, valid):
  """Forward pass under differentiation: one int32 sort, then each element's gradient."""
  keys = _sort_keys(errors, positive, valid)
  sorted_keys = lax.sort(keys, dimension=keys.ndim - 1, is_stable=False)
  loss, _ = _lovasz_from_sorted(sorted_keys)
  return loss, (_element_gradients(keys, sorted_keys), errors > 0.0)


def _lovasz_rows_bwd(residuals, cotangent):
  """d loss / d errors: each element's Lovasz gradient, 0 where error <= 0 (the hinge is flat)
  or the pixel is invalid; labels and valid get no cotangent."""
  gradient, active = residuals
  error_gradient = jnp.where(active, gradient, 0.0) * cotangent[..., None]
  return error_gradient, None, None


_lovasz_rows.defvjp(_lovasz_rows_fwd, _lovasz_rows_bwd)


def lovasz_hinge(logits: jax.Array, labels: jax.Array, valid: jax.Array, *,
                 per_image: bool = False) -> jax.Array:
  """Binary Lovasz hinge (Berman et al. 2018) per class, averaged over classes.

  For each class, errors ``1 - logit * (2 * label - 1)`` are sorted in descending order and
  ``relu(errors)`` is dotted with the Lovasz gradient of the Jaccard loss. Invalid pixels are
  sorted last with zero hinge and zero gradient: value and gradient are exactly those of the valid
  pixels alone (fixed shapes, no filtering). The gradient (a subgradient at ties) is a custom VJP
  that finds each element's place in the sorted row by binary search (tied elements share their
  group's mean gradient): value and gradient need one int32 sort. Integer keys matter on XLA:CPU,
  where only a single-operand sort of plain integers takes the fast std::sort path (about 4x
  faster than a float sort, whose comparator is a total order, or a (key, index) pair sort).

  Args:
    logits: (B, H, W, C) per-class logits.
    labels: (B, H, W, C) multi-hot targets (positive where > 0.5).
    valid: (B, H, W) bool.
    per_image: one loss per image and class, averaged over the images that have a valid pixel;
      otherwise (the authors' default) one loss per class over the whole batch.

  Returns:
    float32 scalar (0 when no pixel is valid).
  """
  logits, labels, valid = _prepare(logits, labels, valid)
  batch, height, width, classes = logits.shape
  positive = labels > 0.5
  errors = 1.0 - logits * jnp.where(positive, 1.0, -1.0)
  row_shape = (classes, batch, height * width) if per_image else (classes, batch * height * width)

  def rows(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, -1, 0).reshape(row_shape)

  valid_rows = rows(jnp.broadcast_to(valid[..., None], logits.shape))
  losses = _lovasz_rows(rows(errors), rows(positive), valid_rows)
  if per_image:
    has_valid = jnp.any(valid, axis=(1, 2)).astype(jnp.float32)
    losses = jnp.sum(losses * has_valid, axis=1) / jnp.maximum(jnp.sum(has_valid), 1.0)
  return jnp.mean(losses)


def hybrid(logits: jax.Array, labels: jax.Array, valid: jax.Array, lambda_dice: float,
           lambda_lovasz: float, *, lovasz_per_image: bool = False, dice_per_class: bool = False,
           bce_over_all_pixels: bool = False) -> jax.Array:
  """The paper's hybrid loss ``(BCE + l1 * Dice + l2 * Lovasz) / (1 + l1 + l2)``.

  Terms with a zero weight are not computed (as in the authors' code).

  Args:
    logits: (B, H, W, C) per-class logits.
    labels: (B, H, W, C) multi-hot targets.
    valid: (B, H, W) bool.
    lambda_dice: l1 >= 0, a Python number.
    lambda_lovasz: l2 >= 0, a Python number.
    lovasz_per_image: ``lovasz_hinge(per_image=...)``.
    dice_per_class: ``dice(per_class=...)``.
    bce_over_all_pixels: ``bce(over_all_pixels=...)``.

  Returns:
    float32 scalar.
  """
  for name, weight in (('lambda_dice', lambda_dice), ('lambda_lovasz', lambda_lovasz)):
    if not weight >= 0:
      raise ValueError(f'{name} must be >= 0; got {weight}')
  total = bce(logits, labels, valid, over_all_pixels=bce_over_all_pixels)
  if lambda_dice:
    total = total + lambda_dice * dice(logits, labels, valid, per_class=dice_per_class)
  if lambda_lovasz:
    total = total + lambda_lovasz * lovasz_hinge(logits, labels, valid,
                                                 per_image=lovasz_per_image)
  return total / (1.0 + lambda_dice + lambda_lovasz)


def _group_mean(loss: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
                group_size: int, logits: jax.Array, labels: jax.Array,
                valid: jax.Array) -> jax.Array:
  """Mean over consecutive groups of ``group_size`` images of ``loss`` of each group (vmapped).

  logits, labels (B, H, W, C), valid (B, H, W) with B a multiple of ``group_size`` -> scalar.
  """
  def groups(x: jax.Array) -> jax.Array:
    return x.reshape((x.shape[0] // group_size, group_size) + x.shape[1:])

  return jnp.mean(jax.vmap(loss)(groups(logits), groups(labels), groups(valid)))


def make_loss(loss_config: Any, mesh: jax.sharding.Mesh | None = None
              ) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """The training loss of ``config.loss``: the mean over loss groups of the hybrid loss.

  ``loss_config.group_size`` images form a group (0: the whole batch is one group); the loss is
  the mean over the groups of ``hybrid`` on each group, so BCE, the global soft Dice and the
  per-batch Lovasz hinge each cover one group. With 16 this is the authors' objective: DDP over
  2 GPUs x 16 images, each GPU's loss on its own images, gradients averaged. The fields are read
  as they are (``configuration.validate`` checks them).

  When ``mesh`` is given and every group lies within one device's shard of the batch (the batch
  split over the mesh's 'data' axis, group_size dividing the per-device batch), each device
  computes the losses of its own groups (``jax.shard_map``) and one scalar ``pmean`` combines
  them: no image crosses devices. Otherwise the batch is reshaped into groups and XLA partitions
  the computation.

  Args:
    loss_config: ``config.loss``: lambda_dice, lambda_lovasz (numbers >= 0), lovasz_per_image,
      dice_per_class, bce_over_all_pixels (bools), group_size (int >= 0).
    mesh: the mesh whose 'data' axis splits the batch, or None. With an Explicit-axes mesh
      the inputs must already be split along 'data' (an Auto mesh reshards them as needed).

  Returns:
    ``loss(logits (B,H,W,C), labels (B,H,W,C), valid (B,H,W)) -> float32 scalar``; it raises a
    ValueError naming ``config.loss.group_size`` when that does not divide B.
  """
  group_loss = functools.partial(
      hybrid, lambda_dice=loss_config.lambda_dice, lambda_lovasz=loss_config.lambda_lovasz,
      lovasz_per_image=loss_config.lovasz_per_image, dice_per_class=loss_config.dice_per_class,
      bce_over_all_pixels=loss_config.bce_over_all_pixels)
  group_size = loss_config.group_size

  def loss(logits: jax.Array, labels: jax.Array, valid: jax.Array) -> jax.Array:
    batch = logits.shape[0]
    if group_size in (0, batch):
      return group_loss(logits, labels, valid)
    if batch % group_size:
      raise ValueError(f'config.loss.group_size={group_size} does not divide the batch of '
                       f'{batch} images')
    grouped = functools.partial(_group_mean, group_loss, group_size)
    devices = mesh.shape[DATA_AXIS] if mesh is not None else 0
    if devices and batch % devices == 0 and (batch // devices) % group_size == 0:
      per_device = lambda x, y, v: lax.pmean(grouped(x, y, v), DATA_AXIS)
      return jax.shard_map(per_device, mesh=mesh, in_specs=P(DATA_AXIS),
                           out_specs=P())(logits, labels, valid)
    return grouped(logits, labels, valid)

  return loss
