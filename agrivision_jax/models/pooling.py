"""Max pooling with PyTorch's gradient rule and a cheap backward pass.

``jax.grad`` of ``lax.reduce_window(max)`` lowers on XLA:CPU to a variadic reduce-window over
(value, iota) pairs plus large index tensors. Here the backward pass recomputes, per window tap,
whether the tap holds the window's maximum, and routes the cotangent to the first such tap in
row-major window order (``torch.nn.functional.max_pool2d``'s choice at ties) with strided pads:
a few elementwise fusions.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax


def _padded_taps(x: jax.Array, window: int, stride: int, padding: int,
                 output_shape: tuple[int, ...]):
  """Yields ((i, j), x_pad[:, i::stride, j::stride] cropped to the output) per window tap."""
  _, out_h, out_w, _ = output_shape
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                   constant_values=-jnp.inf)
  for i in range(window):
    for j in range(window):
      yield (i, j), lax.slice(padded, (0, i, j, 0),
                              (x.shape[0], i + (out_h - 1) * stride + 1,
                               j + (out_w - 1) * stride + 1, x.shape[3]),
                              (1, stride, stride, 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, window: int, stride: int, padding: int) -> jax.Array:
  """Square max pooling of NHWC maps with symmetric -inf padding (``nn.MaxPool2d`` semantics).

  Args:
    x: (B, H, W, C).
    window: window size k (k x k).
    stride: stride s in both dims.
    padding: p rows and columns of -inf on each side.

  Returns:
    (B, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1, C).
  """
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _max_pool_fwd(x, window, stride, padding):
  y = max_pool(x, window, stride, padding)
  return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, cotangent):
  """Routes each output's cotangent to the first tap (row-major) equal to the window maximum."""
  x, y = residuals
  height, width = x.shape[1] + 2 * padding, x.shape[2] + 2 * padding
  _, out_h, out_w, _ = y.shape
  taken = jnp.zeros(y.shape, bool)
  gradient = jnp.zeros((x.shape[0], height, width, x.shape[3]), cotangent.dtype)
  for (i, j), tap in _padded_taps(x, window, stride, padding, y.shape):
    chosen = (tap == y) & ~taken
    taken = taken | chosen
    routed = jnp.where(chosen, cotangent, 0).astype(cotangent.dtype)
    gradient = gradient + lax.pad(
        routed, jnp.zeros((), cotangent.dtype),
        ((0, 0, 0), (i, height - i - (out_h - 1) * stride - 1, stride - 1),
         (j, width - j - (out_w - 1) * stride - 1, stride - 1), (0, 0, 0)))
  return (gradient[:, padding:height - padding, padding:width - padding, :],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
