"""Convolution primitive for the models' ``nn.Conv`` layers."""
from typing import Any, Sequence

import jax
from jax import lax


def conv_general_dilated(inputs: jax.Array, kernel: jax.Array, window_strides: Sequence[int],
                         padding: Any, lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, precision: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` for NHWC inputs and HWIO kernels, 1x1 kernels as a matmul."""
  pointwise = (kernel.shape[:2] == (1, 1) and feature_group_count == 1
               and all(p == (0, 0) for p in padding)
               and all(d == 1 for d in (lhs_dilation or (1, 1))))
  if not pointwise:
    return lax.conv_general_dilated(inputs, kernel, window_strides, padding, lhs_dilation,
                                    rhs_dilation, dimension_numbers, feature_group_count,
                                    precision=precision)
  sh, sw = window_strides
  if (sh, sw) != (1, 1):
    inputs = inputs[:, ::sh, ::sw, :]
  return lax.dot_general(inputs, kernel[0, 0], (((3,), (0,)), ((), ())), precision=precision)
