"""models/conv.py against lax.conv_general_dilated: values and both gradients, random non-square
maps, every rewrite (dead dilated taps, per-tap regions, 1x1 matmuls, strided 1x1) and the
untouched cases; the padding fraction against a brute-force count."""
import jax
import numpy as np
import pytest
from jax import lax

from agrivision_jax.models import conv

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

CASES = [  # (H, W, kernel, stride, dilation, pad); 20 input channels unless stated
    (9, 7, 1, 1, 1, 0),     # matmul
    (9, 7, 1, 2, 1, 0),     # strided matmul
    (9, 7, 3, 1, 1, 1),     # plain 3x3
    (9, 7, 3, 2, 1, 1),     # strided 3x3
    (5, 7, 3, 1, 6, 6),     # rate 6: rows all dead, columns alive beyond 6
    (5, 4, 3, 1, 6, 6),     # rate 6 past both sides: a 1x1 matmul
    (6, 13, 3, 1, 12, 12),  # rows dead, columns partly alive
    (3, 2, 3, 1, 2, 2),     # rate 2 on a tiny map: partly alive
    (1, 1, 3, 1, 1, 1),     # 1x1 map: only the centre tap
    (5, 6, 3, 2, 4, 4),     # strided and dilated
    (8, 9, 7, 2, 1, 3),     # the stem's 7x7/2
    (2, 3, 7, 2, 1, 3),     # 7x7/2 on a tiny map: outer taps dead
    (11, 9, 3, 1, 4, 4),    # per-tap regions (padding fraction >= 0.3)
    (13, 8, 3, 1, 5, 5),    # per-tap regions, non-square
    (16, 16, 3, 1, 2, 2),   # below the threshold: direct convolution
]
FEW_CHANNEL_CASES = [(40, 34, 7, 2, 1, 3)]  # the stem: 4 input channels


@pytest.mark.parametrize('height, width, kernel, stride, dilation, pad, channels',
                         [case + (20,) for case in CASES] + [case + (4,) for case in FEW_CHANNEL_CASES])
def test_conv_equals_lax(height, width, kernel, stride, dilation, pad, channels):
  rng = np.random.default_rng(height * 100 + width + kernel + dilation)
  x = rng.standard_normal((2, height, width, channels)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, channels, 6)).astype(np.float32)
  args = dict(window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
              rhs_dilation=(dilation, dilation), dimension_numbers=DIMENSION_NUMBERS)

  def reference(x, w):
    return lax.conv_general_dilated(x, w, **args)

  def ours(x, w):
    return conv.conv_general_dilated(x, w, **args)

  expected, expected_vjp = jax.vjp(reference, x, w)
  value, vjp = jax.vjp(ours, x, w)
  assert value.shape == expected.shape
  # float32 sums in another order: errors relative to the output's scale.
  np.testing.assert_allclose(value, expected, atol=1e-6 * np.abs(expected).max())
  cotangent = rng.standard_normal(expected.shape).astype(np.float32)
  for got, want in zip(vjp(cotangent), expected_vjp(cotangent)):
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(want).max())


def test_dead_taps_are_dropped():
  x = np.ones((1, 4, 5, 2), np.float32)
  w = np.ones((3, 3, 2, 3), np.float32)
  lowered = jax.jit(lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), ((6, 6), (6, 6)), rhs_dilation=(6, 6),
      dimension_numbers=DIMENSION_NUMBERS)).lower(x, w).as_text()
  assert 'convolution' not in lowered and 'dot_general' in lowered


def test_rejects_grouped_and_transposed_convolutions():
  x = np.ones((1, 4, 4, 2), np.float32)
  w = np.ones((3, 3, 1, 2), np.float32)
  with pytest.raises(ValueError, match='feature_group_count=2'):
    conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), feature_group_count=2,
                              dimension_numbers=DIMENSION_NUMBERS)
  with pytest.raises(ValueError, match='lhs_dilation'):
    conv.conv_general_dilated(x, np.ones((3, 3, 2, 2), np.float32), (1, 1), ((1, 1), (1, 1)),
                              lhs_dilation=(2, 2), dimension_numbers=DIMENSION_NUMBERS)


def _brute_force_padding_fraction(height, width, kernel, dilation, pad):
  out_h = height + 2 * pad - dilation * (kernel - 1)
  out_w = width + 2 * pad - dilation * (kernel - 1)
  padded = total = 0
  for o_h in range(out_h):
    for o_w in range(out_w):
      for i in range(kernel):
        for j in range(kernel):
          row, col = o_h + i * dilation - pad, o_w + j * dilation - pad
          padded += not (0 <= row < height and 0 <= col < width)
          total += 1
  return padded / total


@pytest.mark.parametrize('height, width, kernel, dilation, pad',
                         [(16, 16, 3, 2, 2), (16, 16, 3, 12, 12), (11, 9, 3, 4, 4), (7, 5, 5, 1, 2),
                          (32, 24, 3, 18, 18), (4, 6, 3, 1, 0)])
def test_padding_fraction_equals_brute_force(height, width, kernel, dilation, pad):
  fraction = conv.padding_fraction((height, width), (kernel, kernel), (dilation, dilation),
                                   ((pad, pad), (pad, pad)))
  assert fraction == pytest.approx(
      _brute_force_padding_fraction(height, width, kernel, dilation, pad), abs=1e-12)


@pytest.mark.parametrize('dilation, expect_convolution', [(2, True), (4, False)])
def test_region_split_only_above_the_threshold(dilation, expect_convolution):
  x = np.ones((1, 16, 16, 2), np.float32)
  w = np.ones((3, 3, 2, 3), np.float32)
  lowered = jax.jit(lambda x, w: conv.conv_general_dilated(
      x, w, (1, 1), ((dilation, dilation),) * 2, rhs_dilation=(dilation, dilation),
      dimension_numbers=DIMENSION_NUMBERS)).lower(x, w).as_text()
  assert ('convolution' in lowered) == expect_convolution


def test_rejects_other_layouts():
  x = np.ones((1, 2, 4, 4), np.float32)
  w = np.ones((2, 2, 3, 3), np.float32)
  with pytest.raises(ValueError, match='only NHWC / HWIO / NHWC'):
    conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                              dimension_numbers=('NCHW', 'OIHW', 'NCHW'))


@pytest.mark.parametrize('dtype', [np.float32, jax.numpy.bfloat16])
def test_matmul_channels_vjp_equals_einsum(dtype):
  rng = np.random.default_rng(7)
  x = rng.standard_normal((2, 5, 3, 6)).astype(np.float32)
  w = rng.standard_normal((6, 4)).astype(np.float32)
  dy = rng.standard_normal((2, 5, 3, 4)).astype(np.float32)
  out, vjp = jax.vjp(conv.matmul_channels, x.astype(dtype), w.astype(dtype))
  dx, dw = vjp(dy.astype(dtype))
  assert out.dtype == dx.dtype == dw.dtype == dtype
  # Reference in float64 on the same (rounded) operands.
  x64, w64, dy64 = (np.asarray(a.astype(dtype), np.float64) for a in (x, w, dy))
  tol = 1e-5 if dtype == np.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(out, np.float64), np.einsum('bhwc,co->bhwo', x64, w64),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(dx, np.float64), np.einsum('bhwo,co->bhwc', dy64, w64),
                             rtol=tol, atol=tol)
  np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum('bhwc,bhwo->co', x64, dy64),
                             rtol=tol, atol=tol * 4)


@pytest.mark.parametrize('strides, padding, dilation', [((1, 1), ((1, 1), (1, 1)), (1, 1)),
                                                        ((1, 1), ((2, 0), (1, 2)), (2, 1)),
                                                        ((2, 3), ((1, 1), (2, 1)), (1, 1))])
def test_tap_weight_gradient_equals_brute_force(strides, padding, dilation):
  rng = np.random.default_rng(11)
  x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
  w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
  out, vjp = jax.vjp(
      lambda x, w: conv.conv_tap_weight_gradient(x, w, strides, padding, dilation), x, w)
  dy = rng.standard_normal(out.shape).astype(np.float32)
  dx, dw = vjp(dy)
  # d kernel[i, j, c, o] = sum over outputs (b, r, s) of
  # x[b, r*sh + i*dh - top, s*sw + j*dw - left, c] * dy[b, r, s, o], reading zero outside x.
  (top, _), (left, _) = padding
  expected = np.zeros(w.shape, np.float64)
  for i in range(3):
    for j in range(3):
      for r in range(out.shape[1]):
        for s in range(out.shape[2]):
          row = r * strides[0] + i * dilation[0] - top
          col = s * strides[1] + j * dilation[1] - left
          if 0 <= row < x.shape[1] and 0 <= col < x.shape[2]:
            expected[i, j] += np.einsum('bc,bo->co', x[:, row, col], dy[:, r, s])
  np.testing.assert_allclose(dw, expected, rtol=1e-5, atol=1e-5)
  reference = lambda x: lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilation,
                                                 dimension_numbers=DIMENSION_NUMBERS)
  ref_out, ref_vjp = jax.vjp(reference, x)
  np.testing.assert_allclose(out, ref_out, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx, ref_vjp(dy)[0], rtol=1e-6, atol=1e-6)
  backward = jax.jit(lambda x, w: vjp(dy)).lower(x, w).as_text()
  assert backward.count('stablehlo.convolution') == 1  # d inputs only; d kernel is 9 dot_generals


@pytest.mark.parametrize('conv_impl', ['xla', 'cpu_gemm'])
@pytest.mark.parametrize('height, width, kernel, stride, dilation, pad', [
    (9, 7, 1, 2, 1, 0), (5, 7, 3, 1, 6, 6), (13, 8, 3, 1, 5, 5), (8, 9, 7, 2, 1, 3)])
def test_conv_modules_equal_lax(conv_impl, height, width, kernel, stride, dilation, pad):
  """Each ``CONV_MODULES`` entry builds an nn.Conv (same 'kernel' param) computing
  lax.conv_general_dilated; 'xla' lowers to exactly one plain convolution (no rewrites)."""
  rng = np.random.default_rng(height + 10 * kernel)
  x = rng.standard_normal((2, height, width, 5)).astype(np.float32)
  layer = conv.CONV_MODULES[conv_impl](
      6, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      kernel_dilation=(dilation, dilation), use_bias=False)
  params = layer.init(jax.random.key(0), x)['params']
  assert list(params) == ['kernel'] and params['kernel'].shape == (kernel, kernel, 5, 6)
  expected = lax.conv_general_dilated(
      x, params['kernel'], (stride, stride), ((pad, pad), (pad, pad)),
      rhs_dilation=(dilation, dilation), dimension_numbers=DIMENSION_NUMBERS)
  np.testing.assert_allclose(layer.apply({'params': params}, x), expected,
                             atol=1e-6 * np.abs(expected).max())
  if conv_impl == 'xla':
    lowered = jax.jit(lambda p, x: layer.apply({'params': p}, x)).lower(params, x).as_text()
    assert lowered.count('stablehlo.convolution') == 1 and 'dot_general' not in lowered
