"""models/conv.py against lax.conv_general_dilated: values and both gradients, random non-square
maps, every rewrite (dead dilated taps, 1x1 matmuls, strided 1x1) and the untouched cases."""
import jax
import numpy as np
import pytest
from jax import lax

from agrivision_jax.models import conv

DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')

CASES = [  # (H, W, kernel, stride, dilation, pad)
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
]


@pytest.mark.parametrize('height, width, kernel, stride, dilation, pad', CASES)
def test_conv_equals_lax(height, width, kernel, stride, dilation, pad):
  rng = np.random.default_rng(height * 100 + width + kernel + dilation)
  x = rng.standard_normal((2, height, width, 5)).astype(np.float32)
  w = rng.standard_normal((kernel, kernel, 5, 4)).astype(np.float32)
  args = dict(window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
              rhs_dilation=(dilation, dilation), dimension_numbers=DIMENSION_NUMBERS)

  def reference(x, w):
    return lax.conv_general_dilated(x, w, **args)

  def ours(x, w):
    return conv.conv_general_dilated(x, w, **args)

  expected, expected_vjp = jax.vjp(reference, x, w)
  value, vjp = jax.vjp(ours, x, w)
  assert value.shape == expected.shape
  np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-5)
  cotangent = rng.standard_normal(expected.shape).astype(np.float32)
  for got, want in zip(vjp(cotangent), expected_vjp(cotangent)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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
