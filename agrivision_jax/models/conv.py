"""The convolution of the models' ``nn.Conv`` layers (``conv_general_dilated=...``).

Exactly ``lax.conv_general_dilated`` on NHWC inputs and HWIO kernels, rewritten where XLA:CPU is
slow and the result is the same:

* kernel taps that read only padding for every output position (a dilated 3x3 whose dilation
  reaches past the feature map, e.g. ASPP rate 18 on a 16x16 map) are dropped, with the padding
  shrunk to match, so no work is spent on zeros;
* 1x1 convolutions without padding become a strided slice and a matmul, whose weight gradient
  is a GEMM over batch x pixels instead of a convolution over transposed activations.
"""
from typing import Any, Sequence

import jax
from jax import lax


def _live_taps(size: int, kernel: int, dilation: int, padding: tuple[int, int],
               stride: int) -> tuple[int, int]:
  """[first, last] kernel taps along one spatial dim that read an input element for some output.

  Tap k reads input index ``o * stride + k * dilation - padding[0]`` at output o.
  """
  low, high = padding
  outputs = (size + low + high - dilation * (kernel - 1) - 1) // stride + 1
  live = [k for k in range(kernel)
          if (outputs - 1) * stride + k * dilation - low >= 0 and k * dilation - low < size]
  return (live[0], live[-1]) if live else (0, kernel - 1)


def conv_general_dilated(inputs: jax.Array, kernel: jax.Array, window_strides: Sequence[int],
                         padding: Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None, dimension_numbers: Any = None,
                         feature_group_count: int = 1, precision: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` for inputs (B,H,W,Cin) and kernels (kh,kw,Cin,Cout).

  Args:
    inputs: (B, H, W, Cin).
    kernel: (kh, kw, Cin, Cout).
    window_strides: (sh, sw).
    padding: explicit ((top, bottom), (left, right)) padding.
    lhs_dilation: must be None or (1, 1) (no transposed convolutions here).
    rhs_dilation: (dh, dw) kernel dilation; None = (1, 1).
    dimension_numbers: must describe NHWC / HWIO / NHWC (what ``nn.Conv`` passes).
    feature_group_count: must be 1.
    precision: passed through.

  Returns:
    (B, Ho, Wo, Cout), as ``lax.conv_general_dilated``.
  """
  if tuple(lhs_dilation or (1, 1)) != (1, 1) or feature_group_count != 1:
    raise ValueError('only dense convolutions without input dilation are supported; got '
                     f'lhs_dilation={lhs_dilation}, feature_group_count={feature_group_count}')
  dilation = tuple(rhs_dilation or (1, 1))
  padding = [tuple(p) for p in padding]
  spans = [_live_taps(inputs.shape[1 + axis], kernel.shape[axis], dilation[axis], padding[axis],
                      window_strides[axis]) for axis in range(2)]
  if any(span != (0, kernel.shape[axis] - 1) for axis, span in enumerate(spans)):
    (top, bottom), (left, right) = spans
    padding = [(low - first * d, high - (size - 1 - last) * d)
               for (low, high), (first, last), d, size
               in zip(padding, spans, dilation, kernel.shape[:2])]
    kernel = kernel[top:bottom + 1, left:right + 1]
  if kernel.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding):
    sh, sw = window_strides
    return lax.dot_general(inputs[:, ::sh, ::sw, :], kernel[0, 0], (((3,), (0,)), ((), ())),
                           precision=precision)
  return lax.conv_general_dilated(inputs, kernel, window_strides, padding,
                                  rhs_dilation=dilation, dimension_numbers=dimension_numbers,
                                  precision=precision)
