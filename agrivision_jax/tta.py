"""Test-time augmentation over the dihedral group of the square (rotations by 90 degrees and flips).

A transform is ``x -> rot90(flip_W(x) if flip else x, k)`` on the spatial axes of an NHWC array.
The prediction of an image under TTA is the mean over a set of transforms ``g`` of
``g^-1(f(g(x)))``. Both sets offered here are groups (D4, and its subgroup of the identity, the
horizontal flip, the vertical flip and the 180 degree rotation), so the averaged output is exactly
equivariant to every transform in the set: ``TTA(g(x)) = g(TTA(x))``.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

TTA_MODES = ('none', 'flips', 'd4')


@dataclasses.dataclass(frozen=True)
class Dihedral:
  """One element of D4 acting on NHWC arrays: flip the W axis (if ``flip``), then rotate ``k`` quarter
  turns (``jnp.rot90`` on axes (H, W))."""
  k: int
  flip: bool

  def forward(self, x: jax.Array) -> jax.Array:
    """Applies the transform to ``x`` (B, H, W, C); returns (B, H, W, C), or (B, W, H, C) for odd k."""
    if self.flip:
      x = jnp.flip(x, axis=2)
    return jnp.rot90(x, self.k, axes=(1, 2))

  def inverse(self, y: jax.Array) -> jax.Array:
    """Undoes ``forward`` on ``y`` (B, H', W', C) (e.g. logits of a transformed image)."""
    y = jnp.rot90(y, -self.k, axes=(1, 2))
    if self.flip:
      y = jnp.flip(y, axis=2)
    return y


def transforms_for(mode: str) -> tuple[Dihedral, ...]:
  """Returns the transforms of a TTA mode: 'none' (identity), 'flips' (identity, horizontal flip,
  vertical flip, both = 180 degree rotation), 'd4' (all 8 rotations and reflections)."""
  if mode == 'none':
    return (Dihedral(0, False),)
  if mode == 'flips':
    # (2, True) is the vertical flip: rot180(flip_W(x)) = flip_H(x).
    return (Dihedral(0, False), Dihedral(0, True), Dihedral(2, True), Dihedral(2, False))
  if mode == 'd4':
    return tuple(Dihedral(k, flip) for flip in (False, True) for k in range(4))
  raise ValueError(f'config.predict.tta must be one of {TTA_MODES}, got {mode!r}')


def tta_logits(forward: Callable[[jax.Array], jax.Array], images: jax.Array,
               mode: str) -> jax.Array:
  """Averages ``forward``'s logits over the transforms of ``mode``, each undone before averaging.

  Args:
    forward: maps images (B, H, W, Cin) to logits (B, H, W, C) at the input size, for any H, W
      (typically a jitted ``model.apply``; it is called once per transform, so a square input
      compiles once and a non-square one twice).
    images: (B, H, W, Cin) float32.
    mode: 'none' | 'flips' | 'd4'.

  Returns:
    (B, H, W, C) float32 mean logits.
  """
  transforms = transforms_for(mode)
  total = None
  for transform in transforms:
    logits = transform.inverse(forward(transform.forward(images)))
    total = logits if total is None else total + logits
  return total / len(transforms)
