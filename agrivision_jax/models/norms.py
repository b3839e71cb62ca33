"""Normalisation layers of the IBN-Net / IBN-s backbones, NHWC.

Every layer computes its statistics in float32 (also when the compute dtype is bfloat16; in
float64 when the input is float64, which the parity tests use), folds them into per-channel
coefficients ``a, b`` and returns ``x * a + b`` cast to its ``dtype``, so a norm is one fused
elementwise pass over the activation. The coefficients are exposed through ``coefficients`` so
that :class:`IBN` can join the IN and BN halves without slicing and concatenating the activation
itself.

There is no ``axis_name``: under ``jax.jit`` with the batch sharded over a mesh, batch statistics
are reduced over the global batch (SyncBN semantics), with XLA inserting the collectives. Each
layer's cross-batch statistics are ONE reduction of a stacked [mean, mean of squares] array, so a
norm layer costs one all-reduce in the forward pass (as PyTorch's SyncBatchNorm, which gathers
mean and inverse std together), not two as a centred two-pass variance would. To keep the
one-pass variance accurate in float32, the values are first shifted by a detached per-channel
estimate of their mean that every device already holds: the layer's running mean (see
``_batch_moments``). Per-image statistics (InstanceNorm, SN's IN and LN terms) need no
communication and use the two-pass (centred) variance.

Numerics follow PyTorch: eps 1e-5, running averages ``r = 0.9 r + 0.1 batch`` (torch momentum 0.1),
BatchNorm's running variance uses the unbiased batch variance (torch does; flax's ``nn.BatchNorm``
does not, so it is not used here). Variable names follow flax's BatchNorm: params ``scale``,
``bias``; batch_stats ``mean``, ``var``.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

EPSILON = 1e-5
MOMENTUM = 0.9  # keep factor of the running averages (PyTorch momentum 0.1)


def _stats_dtype(dtype: Dtype) -> Dtype:
  """float32 for bfloat16/float32 inputs, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def _moments(x: Array, axes: tuple[int, ...], ddof: int = 0) -> tuple[Array, Array]:
  """Mean and two-pass (centred) variance of ``x`` over ``axes`` in at least float32 (kept dims).

  For per-image statistics (reduced axes local to a device): the one-pass E[x^2] - E[x]^2 loses
  ~1e-4 relative accuracy through a deep train-mode IBN network (instance means are large
  against their spread).

  Args:
    x: any-shape array.
    axes: reduced axes.
    ddof: 0 for the biased variance, 1 for the unbiased one.
  Returns:
    (mean, var) in ``_stats_dtype(x.dtype)``, with the reduced axes kept as size 1.
  """
  x = x.astype(_stats_dtype(x.dtype))
  mean = jnp.mean(x, axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
  if ddof:
    count = 1
    for axis in axes:
      count *= x.shape[axis]
    var = var * (count / (count - ddof))
  return mean, var


def _batch_moments(x: Array, shift: Array) -> tuple[Array, Array]:
  """Mean and biased variance over (B, H, W) of x (B,H,W,C) by ONE reduction: (C,) each.

  With ``d = x - shift``: ``var = E[d^2] - E[d]^2``, ``E[d] = E[x] - shift``. The per-image means
  of x and d^2 are stacked and averaged over the batch together, so under a batch-sharded
  ``jax.jit`` the statistics cost one all-reduce. The shift is a detached per-channel value
  replicated on every device (the running mean): the float32 rounding error of the variance is
  about 1e-7 * (1 + 2 |mean - shift| |mean| / var + (mean - shift)^2 / var) relative, so it is
  negligible once the running mean tracks the batch mean, and at the start of training (running
  mean 0) it equals that of the plain one-pass formula. The gradient of ``var`` does not depend on
  the shift.

  Args:
    x: (B, H, W, C).
    shift: (C,), any value; treated as a constant.
  Returns:
    (mean, var), (C,) each, in ``_stats_dtype(x.dtype)``.
  """
  dtype = _stats_dtype(x.dtype)
  x = x.astype(dtype)
  shift = jax.lax.stop_gradient(shift).astype(dtype)
  # Per-image means of x and (x - shift)^2 first: local to a device's shard, each one fused pass
  # over x with nothing of the activation's size written; then the one cross-batch reduction,
  # of the stacked (2, B, C) partials.
  per_image = jnp.stack([jnp.mean(x, axis=(1, 2)), jnp.mean(jnp.square(x - shift), axis=(1, 2))])
  moments = jnp.mean(per_image, axis=1)  # (2, C)
  mean, mean_d = moments[0], moments[0] - shift
  return mean, moments[1] - jnp.square(mean_d)


def _fold(scale: Array, bias: Array, mean: Array, var: Array,
          epsilon: float) -> tuple[Array, Array]:
  """Folds statistics and affine parameters into ``y = x * a + b`` coefficients."""
  a = scale * jax.lax.rsqrt(var + epsilon)
  return a, bias - mean * a


def _apply(x: Array, a: Array, b: Array, dtype: Dtype) -> Array:
  """``x * a + b`` in at least float32, cast to ``dtype``. x (B,H,W,C); a, b broadcast to x."""
  return (x.astype(_stats_dtype(x.dtype)) * a + b).astype(dtype)


def _affine_params(module: nn.Module, channels: int) -> tuple[Array, Array]:
  """Creates the per-channel ``scale`` (ones) and ``bias`` (zeros) float32 params of a norm."""
  scale = module.param('scale', nn.initializers.ones, (channels,), jnp.float32)
  bias = module.param('bias', nn.initializers.zeros, (channels,), jnp.float32)
  return scale, bias


def _check_nhwc(x: Array, layer: str) -> None:
  if x.ndim != 4:
    raise ValueError(f'{layer} expects NHWC input (4 dims), got shape {x.shape}')


def _explicit_batch_sharding(a: Array):
  """The NamedSharding of ``a`` if its batch axis is sharded over Explicit mesh axes, else None."""
  sharding = jax.typeof(a).sharding
  if not sharding.spec or sharding.spec[0] is None:
    return None
  return sharding


def _replicated(a: Array, sharding) -> Array:
  """``a`` resharded to replicated on ``sharding``'s mesh (Explicit axes)."""
  return jax.sharding.reshard(
      a, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))


class _FoldedNorm(nn.Module):
  """A norm whose ``coefficients(x, train)`` give ``a, b`` with output ``x * a + b``."""

  def __call__(self, x: Array, train: bool = False) -> Array:
    """x (B,H,W,C) -> (B,H,W,C) in ``dtype``; ``train`` uses (and updates) batch statistics."""
    a, b = self.coefficients(x, train)
    return _apply(x, a, b, self.dtype)


class BatchNorm(_FoldedNorm):
  """Batch normalisation equal to ``torch.nn.BatchNorm2d`` (eps 1e-5, momentum 0.1).

  Train mode normalises with the biased batch variance over (B, H, W) and updates the running
  mean and the running *unbiased* variance; eval mode uses the running values.
  Params: scale, bias (C,). batch_stats: mean (init 0), var (init 1), (C,).
  """
  momentum: float = MOMENTUM
  epsilon: float = EPSILON
  dtype: Dtype = jnp.float32

  @nn.compact
  def coefficients(self, x: Array, train: bool) -> tuple[Array, Array]:
    """x (B,H,W,C) -> coefficients a, b (1,1,1,C), float32 or wider, with ``y = x * a + b``."""
    _check_nhwc(x, 'BatchNorm')
    channels = x.shape[-1]
    scale, bias = _affine_params(self, channels)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((channels,), jnp.float32))
    if train:
      count = x.shape[0] * x.shape[1] * x.shape[2]
      if count < 2:
        raise ValueError(f'BatchNorm in training needs more than one value per channel, '
                         f'got input shape {x.shape}')
      mean, var = _batch_moments(x, ra_mean.value)
      if not self.is_initializing():
        unbiased = var * (count / (count - 1))
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    else:
      mean, var = ra_mean.value, ra_var.value
    a, b = _fold(scale, bias, mean, var, self.epsilon)
    return a.reshape(1, 1, 1, channels), b.reshape(1, 1, 1, channels)


class InstanceNorm(_FoldedNorm):
  """Instance normalisation equal to ``torch.nn.InstanceNorm2d(C, affine=True)``.

  Per sample and channel over (H, W), biased variance, eps 1e-5, no running statistics (``train``
  changes nothing). Params: scale, bias (C,).
  """
  epsilon: float = EPSILON
  dtype: Dtype = jnp.float32

  @nn.compact
  def coefficients(self, x: Array, train: bool = False) -> tuple[Array, Array]:
    """x (B,H,W,C) -> coefficients a, b (B,1,1,C), float32 or wider, with ``y = x * a + b``."""
    del train  # no running statistics
    _check_nhwc(x, 'InstanceNorm')
    scale, bias = _affine_params(self, x.shape[-1])
    mean, var = _moments(x, (1, 2))
    return _fold(scale, bias, mean, var, self.epsilon)


class SwitchableNorm(_FoldedNorm):
  """Switchable Normalization (Luo et al.), equal to the reference ``SwitchNorm2d``.

  IN statistics per sample and channel over (H, W) with the UNBIASED variance; LN statistics are
  the channel means of the IN ones (var_ln = mean_c(var_in + mean_in^2) - mean_ln^2) and BN
  statistics the batch means likewise (var_bn = mean_b(var_in + mean_in^2) - mean_bn^2). The
  normaliser is ``softmax(mean_weight) . [IN, LN, BN]`` for the mean and
  ``softmax(var_weight) . [IN, LN, BN]`` for the variance.

  BN statistics groups: with ``group_size`` G = 0 the BN terms are over the whole (global) batch.
  With G > 0, in training, they are computed per group of G consecutive images (B must be a
  multiple of G), as SN layers that are not synchronised across G-image DDP ranks. Under a
  batch-sharded ``jax.jit`` with Auto mesh axes (the train step's), a group that lies inside one
  device's shard needs no cross-device communication; under Explicit axes the small per-image
  statistics (B, C) are replicated before grouping. The running statistics then
  follow the FIRST group only: the authors' DDP run broadcasts rank 0's buffers to every rank at
  each forward (``broadcast_buffers=True``), so rank 0's running averages, updated with its own
  group's statistics, are the ones that persist and are saved.

  Train mode with ``using_moving_average`` updates ``r = 0.9 r + 0.1 batch`` for the BN mean and
  variance (the variance derived as above, not re-estimated); without it the running values
  accumulate ``mean_bn`` and ``mean_bn^2 + var_bn``. Eval mode uses the running values as the BN
  term. With ``using_bn=False`` there is no BN term and no running statistics.

  The batch means of [mean_in - shift, var_in + (mean_in - shift)^2] are one stacked reduction
  (one all-reduce when the batch is sharded), shifted by the running mean as in BatchNorm.

  Params: scale, bias (C,); mean_weight, var_weight (3,) or (2,), init ones.
  batch_stats (when using_bn): mean, var (C,), init ZERO.
  """
  momentum: float = MOMENTUM
  epsilon: float = EPSILON
  using_moving_average: bool = True
  using_bn: bool = True
  group_size: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def coefficients(self, x: Array, train: bool) -> tuple[Array, Array]:
    """x (B,H,W,C) -> coefficients a, b (B,1,1,C), float32 or wider, with ``y = x * a + b``."""
    _check_nhwc(x, 'SwitchableNorm')
    if x.shape[1] * x.shape[2] < 2:
      raise ValueError(f'SwitchableNorm needs at least 2 spatial positions for the unbiased '
                       f'instance variance, got input shape {x.shape}')
    batch, channels = x.shape[0], x.shape[-1]
    scale, bias = _affine_params(self, channels)
    num_terms = 3 if self.using_bn else 2
    mean_weight = self.param('mean_weight', nn.initializers.ones, (num_terms,), jnp.float32)
    var_weight = self.param('var_weight', nn.initializers.ones, (num_terms,), jnp.float32)
    mean_weight = jax.nn.softmax(mean_weight)
    var_weight = jax.nn.softmax(var_weight)

    mean_in, var_in = _moments(x, (1, 2), ddof=1)  # (B,1,1,C)
    mean_ln = jnp.mean(mean_in, axis=-1, keepdims=True)  # (B,1,1,1)
    # mean_c(var_in + mean_in^2) - mean_ln^2, centred (per image: no communication to save).
    var_ln = jnp.mean(var_in + jnp.square(mean_in - mean_ln), axis=-1, keepdims=True)
    mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln
    var = var_weight[0] * var_in + var_weight[1] * var_ln

    if self.using_bn:
      ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((channels,), jnp.float32))
      ra_var = self.variable('batch_stats', 'var', lambda: jnp.zeros((channels,), jnp.float32))
      if train:
        group = self.group_size or batch
        if batch % group:
          raise ValueError(f'SwitchableNorm statistics groups of {group} images '
                           f'(config.model.sn_group_size) do not divide the batch of {batch}')
        # Under Explicit mesh axes the (small) instance statistics are grouped replicated;
        # under Auto axes groups inside a device's shard need no communication.
        explicit = _explicit_batch_sharding(mean_in) if self.group_size else None
        rows_in = [mean_in.reshape(batch, channels), var_in.reshape(batch, channels)]
        if explicit is not None:
          rows_in = [_replicated(rows, explicit) for rows in rows_in]
        shift = jax.lax.stop_gradient(ra_mean.value).astype(mean_in.dtype)
        shape = (batch // group, group, channels)
        centred = rows_in[0].reshape(shape) - shift
        moments = jnp.mean(jnp.stack([centred, rows_in[1].reshape(shape)
                                      + jnp.square(centred)]), axis=2)  # (2, B/G, C)
        mean_bn = moments[0] + shift  # (B/G, C)
        var_bn = moments[1] - jnp.square(moments[0])
        if not self.is_initializing():
          if self.using_moving_average:
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean_bn[0]
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var_bn[0]
          else:
            ra_mean.value = ra_mean.value + mean_bn[0]
            ra_var.value = ra_var.value + jnp.square(mean_bn[0]) + var_bn[0]
        mean_bn, var_bn = (jnp.repeat(m, group, axis=0).reshape(batch, 1, 1, channels)
                           for m in (mean_bn, var_bn))
        if explicit is not None:
          mean_bn, var_bn = (jax.sharding.reshard(m, jax.typeof(mean_in).sharding)
                             for m in (mean_bn, var_bn))
      else:
        mean_bn, var_bn = ra_mean.value, ra_var.value
      mean = mean + mean_weight[2] * mean_bn
      var = var + var_weight[2] * var_bn

    return _fold(scale, bias, mean, var, self.epsilon)


class IBN(_FoldedNorm):
  """IBN-a normalisation (IBN-Net): InstanceNorm on the first ``int(C/2)`` channels, BatchNorm on
  the rest, concatenated. Submodules ``IN`` (InstanceNorm) and ``BN`` (BatchNorm)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def coefficients(self, x: Array, train: bool) -> tuple[Array, Array]:
    """x (B,H,W,C) -> coefficients a, b (B,1,1,C), float32 or wider, with ``y = x * a + b``."""
    _check_nhwc(x, 'IBN')
    batch, channels = x.shape[0], x.shape[-1]
    half = int(channels / 2)
    a_in, b_in = InstanceNorm(name='IN').coefficients(x[..., :half])
    a_bn, b_bn = BatchNorm(name='BN').coefficients(x[..., half:], train)
    bn_shape = (batch, 1, 1, channels - half)
    a = jnp.concatenate([a_in, jnp.broadcast_to(a_bn, bn_shape)], axis=-1)
    b = jnp.concatenate([b_in, jnp.broadcast_to(b_bn, bn_shape)], axis=-1)
    return a, b
