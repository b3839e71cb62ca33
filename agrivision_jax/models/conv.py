"""The convolution kernels behind the models' one conv seam (``config.model.conv_impl``).

Every convolution of the model (backbone, ASPP, decoder, classifier) is built by one
``ModuleDef`` from ``CONV_MODULES``, chosen once by ``models.create_model``:

* ``'xla'``: plain ``flax.linen.Conv``, i.e. ``lax.conv_general_dilated`` with the layer's explicit
  symmetric padding; no rewrites and no custom VJPs (for GPU and TPU).
* ``'cpu_gemm'``: ``nn.Conv`` with ``conv_general_dilated`` below, for XLA:CPU.

Both create the same parameters (``kernel`` (kh,kw,Cin,Cout) and, where used, ``bias``).

``conv_general_dilated`` is exactly ``lax.conv_general_dilated`` on NHWC inputs and HWIO kernels,
rewritten where XLA:CPU is slow and the result is the same:

* kernel taps that read only padding for every output position (a dilated 3x3 whose dilation
  reaches past the feature map, e.g. ASPP rate 18 on a 16x16 map) are dropped, with the padding
  shrunk to match, so no work is spent on zeros;
* stride-1 convolutions of which at least ``REGION_SPLIT_PADDING_FRACTION`` of the kernel reads
  fall in the padding (dilated 3x3s on small maps: stage 4 and ASPP) become one matmul per tap
  over the output rectangle where that tap reads the input, summed: no work on padding;
* 1x1 convolutions without padding become a strided slice and a matmul, whose weight gradient
  is a GEMM over batch x pixels instead of a convolution over transposed activations;
* the other convolutions stay XLA convolutions, but their weight gradient is one GEMM per
  kernel tap (input window^T @ dy) instead of a convolution over transposed activations.

The matmuls over channels (``matmul_channels``) have their own VJP: autodiff's weight gradient
of ``dot_general`` contracts (dy^T x) and transposes the small result, which XLA:CPU lays out as a
copy of the large dy; transposing x first and computing x^T dy avoids that copy. The measured
effect of each rewrite is in docs/benchmarks.md.
"""
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# Measured on XLA:CPU (docs/benchmarks.md): the per-tap split is faster from about this fraction of
# padded reads on; below it the direct convolution wins.
REGION_SPLIT_PADDING_FRACTION = 0.3
_NHWC = ('NHWC', 'HWIO', 'NHWC')


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


def _tap_ranges(size: int, kernel: int, dilation: int,
                padding: tuple[int, int]) -> list[tuple[int, int]]:
  """Per tap k along one dim of a stride-1 conv: the output range [start, stop) where
  ``o + k * dilation - padding[0]`` indexes the input (empty when start >= stop)."""
  low, high = padding
  outputs = size + low + high - dilation * (kernel - 1)
  return [(max(0, low - k * dilation), min(outputs, size + low - k * dilation))
          for k in range(kernel)]


def padding_fraction(shape: Sequence[int], kernel: Sequence[int], dilation: Sequence[int],
                     padding: Sequence[tuple[int, int]]) -> float:
  """Fraction of a stride-1 convolution's kernel reads that fall in the padding.

  Args:
    shape: input (H, W).
    kernel: (kh, kw).
    dilation: (dh, dw).
    padding: ((top, bottom), (left, right)).
  """
  reads, total = 1, 1
  for size, k, d, (low, high) in zip(shape, kernel, dilation, padding):
    reads *= sum(max(0, stop - start) for start, stop in _tap_ranges(size, k, d, (low, high)))
    total *= k * (size + low + high - d * (k - 1))
  return 1.0 - reads / total


def _channel_weight_gradient(inputs: jax.Array, d_out: jax.Array, precision: Any) -> jax.Array:
  """(..., Cin), (..., Cout) -> (Cin, Cout): inputs^T @ d_out over all leading axes, with the
  inputs transposed first (XLA:CPU would otherwise copy the larger d_out into a transposed
  layout)."""
  return lax.dot_general(inputs.reshape(-1, inputs.shape[-1]).T,
                         d_out.reshape(-1, d_out.shape[-1]), (((1,), (0,)), ((), ())),
                         precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul_channels(inputs: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
  """(..., Cin) @ (Cin, Cout) -> (..., Cout), as ``lax.dot_general`` over the last axis.

  Its VJP gives d inputs = dy @ kernel^T and d kernel = inputs^T @ dy over all leading axes.
  """
  return lax.dot_general(inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())),
                         precision=precision)


def _matmul_channels_fwd(inputs: jax.Array, kernel: jax.Array, precision: Any):
  return matmul_channels(inputs, kernel, precision), (inputs, kernel)


def _matmul_channels_bwd(precision: Any, residuals: tuple[jax.Array, jax.Array],
                         d_out: jax.Array) -> tuple[jax.Array, jax.Array]:
  inputs, kernel = residuals
  d_inputs = lax.dot_general(d_out, kernel, (((d_out.ndim - 1,), (1,)), ((), ())),
                             precision=precision)
  return d_inputs, _channel_weight_gradient(inputs, d_out, precision)


matmul_channels.defvjp(_matmul_channels_fwd, _matmul_channels_bwd)


def _lax_conv(inputs: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
              padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...],
              precision: Any) -> jax.Array:
  return lax.conv_general_dilated(inputs, kernel, strides, padding, rhs_dilation=dilation,
                                  dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_tap_weight_gradient(inputs: jax.Array, kernel: jax.Array, strides: tuple[int, ...],
                             padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...],
                             precision: Any = None) -> jax.Array:
  """``lax.conv_general_dilated`` (NHWC, HWIO) whose weight gradient is per-tap GEMMs.

  d inputs is autodiff's (a convolution of dy with the flipped kernel); d kernel[i, j] is the
  (strided) input window read by tap (i, j), flattened over batch and pixels and transposed,
  times dy: (Cin, B*Ho*Wo) @ (B*Ho*Wo, Cout), which XLA:CPU runs faster than its weight-gradient
  convolution at the ResNet, stem and decoder shapes (docs/benchmarks.md).
  """
  return _lax_conv(inputs, kernel, strides, padding, dilation, precision)


def _conv_tap_weight_gradient_fwd(inputs, kernel, strides, padding, dilation, precision):
  return _lax_conv(inputs, kernel, strides, padding, dilation, precision), (inputs, kernel)


def _conv_tap_weight_gradient_bwd(strides, padding, dilation, precision, residuals, d_out):
  inputs, kernel = residuals
  _, input_vjp = jax.vjp(
      lambda x: _lax_conv(x, kernel, strides, padding, dilation, precision), inputs)
  (d_inputs,) = input_vjp(d_out)
  kh, kw = kernel.shape[:2]
  out_h, out_w = d_out.shape[1:3]
  padded = lax.pad(inputs, jnp.zeros((), inputs.dtype),
                   [(0, 0, 0), (*padding[0], 0), (*padding[1], 0), (0, 0, 0)])
  taps = []
  for i in range(kh):
    for j in range(kw):
      row, col = i * dilation[0], j * dilation[1]
      window = padded[:, row:row + (out_h - 1) * strides[0] + 1:strides[0],
                      col:col + (out_w - 1) * strides[1] + 1:strides[1], :]
      taps.append(_channel_weight_gradient(window, d_out, precision))
  return d_inputs, jnp.stack(taps).reshape(kernel.shape)


conv_tap_weight_gradient.defvjp(_conv_tap_weight_gradient_fwd, _conv_tap_weight_gradient_bwd)


def _conv_by_tap_regions(inputs: jax.Array, kernel: jax.Array, padding: Sequence[tuple[int, int]],
                         dilation: Sequence[int], precision: Any) -> jax.Array:
  """Stride-1 conv as a sum over taps of (input rectangle @ kernel tap), padded into place."""
  batch, height, width, _ = inputs.shape
  (top, bottom), (left, right) = padding
  out_h = height + top + bottom - dilation[0] * (kernel.shape[0] - 1)
  out_w = width + left + right - dilation[1] * (kernel.shape[1] - 1)
  output = None
  for i, (r0, r1) in enumerate(_tap_ranges(height, kernel.shape[0], dilation[0], padding[0])):
    for j, (c0, c1) in enumerate(_tap_ranges(width, kernel.shape[1], dilation[1], padding[1])):
      if r0 >= r1 or c0 >= c1:
        continue
      rows = r0 + i * dilation[0] - top
      cols = c0 + j * dilation[1] - left
      window = inputs[:, rows:rows + r1 - r0, cols:cols + c1 - c0, :]
      term = matmul_channels(window, kernel[i, j], precision)
      term = jnp.pad(term, ((0, 0), (r0, out_h - r1), (c0, out_w - c1), (0, 0)))
      output = term if output is None else output + term
  if output is None:
    return jnp.zeros((batch, out_h, out_w, kernel.shape[-1]), inputs.dtype)
  return output


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
  nhwc = lax.conv_dimension_numbers(inputs.shape, kernel.shape, _NHWC)
  if dimension_numbers is not None and lax.conv_dimension_numbers(
      inputs.shape, kernel.shape, dimension_numbers) != nhwc:
    raise ValueError(f'only NHWC / HWIO / NHWC convolutions are supported; got {dimension_numbers}')
  dilation = tuple(rhs_dilation or (1, 1))
  padding = [tuple(p) for p in padding]
  spans = [_live_taps(inputs.shape[1 + axis], kernel.shape[axis], dilation[axis], padding[axis],
                      window_strides[axis]) for axis in range(2)]
  if any(span != (0, kernel.shape[axis] - 1) for axis, span in enumerate(spans)):
    (first_row, last_row), (first_col, last_col) = spans
    padding = [(low - first * d, high - (size - 1 - last) * d)
               for (low, high), (first, last), d, size
               in zip(padding, spans, dilation, kernel.shape[:2])]
    kernel = kernel[first_row:last_row + 1, first_col:last_col + 1]
  if kernel.shape[:2] == (1, 1) and all(p == (0, 0) for p in padding):
    sh, sw = window_strides
    return matmul_channels(inputs[:, ::sh, ::sw, :], kernel[0, 0], precision)
  if (tuple(window_strides) == (1, 1)
      and padding_fraction(inputs.shape[1:3], kernel.shape[:2], dilation, padding)
      >= REGION_SPLIT_PADDING_FRACTION):
    return _conv_by_tap_regions(inputs, kernel, padding, dilation, precision)
  return conv_tap_weight_gradient(inputs, kernel, tuple(window_strides), tuple(padding),
                                  dilation, precision)


# conv_impl -> the ModuleDef that builds every convolution (module-level objects, so that two
# models built from the same config compare equal and share jit caches).
CONV_MODULES = {
    'xla': nn.Conv,
    'cpu_gemm': functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated),
}
