"""models/pooling.max_pool against torch.nn.functional.max_pool2d: value and gradient, random
non-square maps, with ties (the gradient goes to the first maximum, as in PyTorch)."""
import jax
import numpy as np
import pytest
import torch

from agrivision_jax.models import pooling


@pytest.mark.parametrize('shape, window, stride, padding', [
    ((2, 9, 7, 3), 3, 2, 1),   # the stem's pool, odd sizes
    ((1, 8, 10, 2), 3, 2, 1),  # even sizes
    ((2, 6, 5, 4), 2, 2, 0),
    ((1, 7, 6, 2), 3, 1, 1),   # overlapping windows, stride 1
])
@pytest.mark.parametrize('with_ties', [False, True])
def test_max_pool_matches_torch(shape, window, stride, padding, with_ties):
  rng = np.random.default_rng(sum(shape) + window)
  x = rng.standard_normal(shape).astype(np.float32)
  if with_ties:
    x = np.round(x).clip(0, None).astype(np.float32)  # post-ReLU-like, many equal values
  x_t = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
  y_t = torch.nn.functional.max_pool2d(x_t, window, stride, padding)
  cotangent = rng.standard_normal(tuple(y_t.permute(0, 2, 3, 1).shape)).astype(np.float32)
  y_t.backward(torch.tensor(cotangent).permute(0, 3, 1, 2))
  expected_y = y_t.detach().permute(0, 2, 3, 1).numpy()
  expected_grad = x_t.grad.permute(0, 2, 3, 1).numpy()

  y, vjp = jax.vjp(lambda v: pooling.max_pool(v, window, stride, padding), x)
  (grad,) = vjp(cotangent)
  np.testing.assert_array_equal(np.asarray(y), expected_y)
  np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-6, atol=1e-6)
  jitted = jax.jit(jax.grad(lambda v: (pooling.max_pool(v, window, stride, padding)
                                       * cotangent).sum()))(x)
  np.testing.assert_allclose(np.asarray(jitted), expected_grad, rtol=1e-6, atol=1e-6)
