"""The authors' training augmentations in numpy, each applied with probability 0.5 in their order.

1. shift / scale / aspect (their randomShiftScaleRotate with shift, scale and aspect limits 1.0 and
   no rotation): scale ~ U(0, 2), aspect ~ U(0, 2), sx = scale * sqrt(aspect),
   sy = scale / sqrt(aspect), dx = round(U(-1, 1) * W), dy = round(U(-1, 1) * H). A source pixel at
   (x, y) moves to (sx (x - W/2) + W/2 + dx, sy (y - H/2) + H/2 + dy); the image is resampled
   bilinearly, labels and valid by nearest neighbour (round half to even), and everything from
   outside the tile is 0, so the border becomes invalid. (cv2.warpPerspective with
   BORDER_CONSTANT 0; cv2 quantises bilinear weights to 1/32, this uses exact weights.)
2. horizontal flip, 3. vertical flip, 4. rot90 (np.rot90: 90 degrees counter-clockwise).

The authors' hue/saturation/value jitter has all limits 0 in their configs and is left out.
"""
from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

SHIFT_SCALE_ASPECT_LIMIT = 1.0
PROBABILITY = 0.5
_TINY = float(np.finfo(np.float32).tiny)


def sample_shift_scale_aspect(rng: np.random.Generator, height: int, width: int,
                              limit: float = SHIFT_SCALE_ASPECT_LIMIT
                              ) -> tuple[float, float, int, int]:
  """Draws (sx, sy, dx, dy) as the authors do; draws of exactly 0 become the tiniest float."""
  scale = max(rng.uniform(1 - limit, 1 + limit), _TINY)
  aspect = max(rng.uniform(1 - limit, 1 + limit), _TINY)
  dx = round(rng.uniform(-limit, limit) * width)
  dy = round(rng.uniform(-limit, limit) * height)
  return scale * math.sqrt(aspect), scale / math.sqrt(aspect), dx, dy


def _source_coordinates(n: int, scale: float, shift: int) -> np.ndarray:
  """float64 (n,): source coordinate of every output pixel along one axis."""
  return (np.arange(n) - n / 2 - shift) / scale + n / 2


def _bilinear_axis(array: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
  """Linear interpolation of float32 `array` along `axis` at `coords`, zero outside."""
  n = array.shape[axis]
  padded = np.concatenate([array, np.zeros_like(np.take(array, [0], axis=axis))], axis=axis)
  lower = np.floor(coords)
  weight = (coords - lower).astype(np.float32)
  result = 0
  for index, w in ((lower, 1 - weight), (lower + 1, weight)):
    inside = (index >= 0) & (index <= n - 1)
    gathered = np.take(padded, np.where(inside, index, n).astype(np.intp), axis=axis)
    shape = [1] * array.ndim
    shape[axis] = coords.shape[0]
    result = result + gathered * w.reshape(shape)
  return result


def _nearest_axis(array: np.ndarray, coords: np.ndarray, axis: int) -> np.ndarray:
  """Nearest-neighbour sampling (round half to even) along `axis`, zero outside."""
  n = array.shape[axis]
  padded = np.concatenate([array, np.zeros_like(np.take(array, [0], axis=axis))], axis=axis)
  index = np.rint(coords)
  inside = (index >= 0) & (index <= n - 1)
  return np.take(padded, np.where(inside, index, n).astype(np.intp), axis=axis)


def shift_scale_aspect(image: np.ndarray, labels: np.ndarray, valid: np.ndarray, sx: float,
                       sy: float, dx: int, dy: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Applies the axis-aligned affine warp with a zero border.

  Args:
    image: uint8 (H, W, Ci); labels: uint8 (H, W, C); valid: bool (H, W).
    sx, sy: scale along x (width) and y (height); dx, dy: shift in pixels.
  Returns:
    (image uint8 (H, W, Ci) bilinear and rounded, labels uint8 (H, W, C) nearest,
     valid bool (H, W) nearest, False where the source lies outside the tile).
  """
  height, width = valid.shape
  ys, xs = _source_coordinates(height, sy, dy), _source_coordinates(width, sx, dx)
  warped = _bilinear_axis(_bilinear_axis(image.astype(np.float32), ys, 0), xs, 1)
  image = np.clip(np.rint(warped), 0, 255).astype(np.uint8)
  labels = _nearest_axis(_nearest_axis(labels, ys, 0), xs, 1)
  valid = _nearest_axis(_nearest_axis(valid, ys, 0), xs, 1)
  return image, labels, valid


def augment(example: dict[str, Any], augment_config: ml_collections.ConfigDict,
            rng: np.random.Generator) -> dict[str, Any]:
  """Applies the switched-on augmentations, each with probability 0.5, in the authors' order.

  Args:
    example: {'image': uint8 (H, W, 4), 'labels': uint8 (H, W, C), 'valid': bool (H, W), ...};
      H == W when rot90 is on.
    augment_config: config.data.augment with bools shift_scale_aspect, hflip, vflip, rot90
      (checked by agrivision_jax.configuration.validate).
    rng: the example's random generator.
  Returns:
    a new example with the same keys; other keys are passed through.
  """
  image, labels, valid = example['image'], example['labels'], example['valid']
  if augment_config.shift_scale_aspect and rng.random() < PROBABILITY:
    sx, sy, dx, dy = sample_shift_scale_aspect(rng, *valid.shape)
    image, labels, valid = shift_scale_aspect(image, labels, valid, sx, sy, dx, dy)
  if augment_config.hflip and rng.random() < PROBABILITY:
    image, labels, valid = image[:, ::-1], labels[:, ::-1], valid[:, ::-1]
  if augment_config.vflip and rng.random() < PROBABILITY:
    image, labels, valid = image[::-1], labels[::-1], valid[::-1]
  if augment_config.rot90 and rng.random() < PROBABILITY:
    image, labels, valid = np.rot90(image), np.rot90(labels), np.rot90(valid)
  return {**example, 'image': np.ascontiguousarray(image),
          'labels': np.ascontiguousarray(labels), 'valid': np.ascontiguousarray(valid)}
