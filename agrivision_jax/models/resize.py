"""Bilinear resize with PyTorch ``align_corners=True`` semantics (``jax.image.resize`` has none).

Output pixel ``o`` of an axis of length ``out`` samples the input at ``o * (in - 1) / (out - 1)``
(0 when ``out == 1``) and interpolates linearly between its two neighbours. Each axis is one
small constant (out, in) interpolation matrix applied by a matmul, which XLA lowers to a dot
(and its gradient to another dot) instead of gathers/scatters.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.lru_cache(maxsize=None)
def interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out_size, in_size) float64 matrix of align_corners=True linear interpolation weights.

  Each row has at most two non-zero weights that sum to 1.
  """
  if out_size < 1 or in_size < 1:
    raise ValueError(f'resize sizes must be positive, got out {out_size}, in {in_size}')
  if out_size == 1:
    src = np.zeros((1,), np.float64)
  else:
    src = np.arange(out_size, dtype=np.float64) * ((in_size - 1) / (out_size - 1))
  lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  upper = np.minimum(lower + 1, in_size - 1)
  frac = src - lower
  matrix = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, lower), 1.0 - frac)
  np.add.at(matrix, (rows, upper), frac)
  return matrix


def resize_bilinear_align_corners(x: Array, size: tuple[int, int]) -> Array:
  """Bilinear resize of NHWC ``x`` to spatial ``size`` like
  ``F.interpolate(mode='bilinear', align_corners=True)``.

  Args:
    x: (B, H, W, C) array (any float dtype; the result keeps it).
    size: (h, w) output spatial size.
  Returns:
    (B, h, w, C) array. Unchanged axes are passed through, a length-1 axis is broadcast.
  """
  out_h, out_w = size
  batch, in_h, in_w, channels = x.shape
  if in_h != out_h:
    if in_h == 1:
      x = jnp.broadcast_to(x, (batch, out_h, in_w, channels))
    else:
      matrix = jnp.asarray(interpolation_matrix(out_h, in_h), x.dtype)
      x = jnp.einsum('oh,bhwc->bowc', matrix, x, precision=jax.lax.Precision.HIGHEST)
  if in_w != out_w:
    if in_w == 1:
      x = jnp.broadcast_to(x, (batch, out_h, out_w, channels))
    else:
      matrix = jnp.asarray(interpolation_matrix(out_w, in_w), x.dtype)
      x = jnp.einsum('pw,bhwc->bhpc', matrix, x, precision=jax.lax.Precision.HIGHEST)
  return x
