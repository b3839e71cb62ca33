"""Synthetic Agriculture-Vision: same layout and file formats, learnable patterns for every class.

Each tile is a field of crop rows (random orientation) on which the patterns of a random subset
of classes are painted with an easy-to-separate colour / NIR / texture signature:

  cloud_shadow          large ellipse darkening every channel (composes with what lies below)
  double_plant          rectangle of dense cyan-green rows at half the row spacing, very high NIR
  planter_skip          strip along the rows of bare light-tan soil, low NIR
  standing_water, water blobs of dark blue, NIR almost black
  waterway              meandering band of olive grey, middle NIR
  weed_cluster          blobs speckled bright yellow, NIR saturated (composes with what lies below)
  drydown               blob of yellow-brown, low-middle NIR
  endrow                band along one tile edge with rows perpendicular to the field's rows
  nutrient_deficiency   blob of pale yellow-green, middle-high NIR

Patterns overlap where cloud shadow or weeds lie over another pattern (labels are multi-hot);
the other patterns are opaque and do not overlap, so every labelled pattern is visible.
Invalid regions: part of the tile outside the field
boundary (gravel) and no-data rectangles (black pixels, mask 0). Labels are set only on valid
pixels, as in the real annotations.

Command line::

  python -m agrivision_jax.data.synthetic --out_dir=DIR --num_train=N --num_val=M --num_test=K \
      --size=S --seed=X [--version=2020]
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import shutil
from typing import Sequence

import numpy as np
from PIL import Image

from agrivision_jax import staging
from agrivision_jax.data import layout

METADATA_FILE = 'synthetic.json'
_ID_CHARS = np.array(list('ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'))
_CROP, _SOIL = (50, 130, 45, 190), (105, 85, 60, 100)
_OUTSIDE = (150, 140, 130, 60)
_SHADOW_FACTOR = 0.55
_CLASS_PROBABILITY = 0.45
# (R, G, B, NIR) of the painted classes; stripes: (colour A, colour B) of striped classes.
_COLOURS = {
    'planter_skip': (185, 160, 120, 60),
    'standing_water': (35, 55, 105, 15),
    'water': (35, 55, 105, 15),
    'waterway': (100, 165, 150, 110),
    'drydown': (200, 170, 70, 110),
    'nutrient_deficiency': (165, 190, 95, 150),
    'weed_cluster': (210, 215, 35, 250),
}
_STRIPES = {
    'double_plant': ((0, 150, 170, 250), (25, 95, 120, 205)),
    'endrow': ((90, 165, 40, 170), (110, 90, 55, 95)),
}


class _Frame:
  """Pixel coordinates of an (S, S) tile, also in the rotated frame of the crop rows."""

  def __init__(self, size: int, angle: float):
    self.size = size
    self.y, self.x = np.mgrid[0:size, 0:size].astype(np.float32)
    # u runs across the rows, v along them.
    self.u = self.x * math.cos(angle) + self.y * math.sin(angle)
    self.v = -self.x * math.sin(angle) + self.y * math.cos(angle)
    self.period = max(4.0, size / 12)

  def rows(self, across: np.ndarray, period: float) -> np.ndarray:
    """bool (S, S): plant pixels of rows running perpendicular to `across`."""
    return np.cos(2 * math.pi * across / period) > -0.2

  def ellipse(self, rng: np.random.Generator, min_radius: float, max_radius: float) -> np.ndarray:
    """bool (S, S): a randomly placed and rotated ellipse."""
    s = self.size
    cx, cy = rng.uniform(0, s, size=2)
    rx, ry = rng.uniform(min_radius * s, max_radius * s, size=2)
    a = rng.uniform(0, math.pi)
    dx, dy = self.x - cx, self.y - cy
    p = dx * math.cos(a) + dy * math.sin(a)
    q = -dx * math.sin(a) + dy * math.cos(a)
    return (p / rx) ** 2 + (q / ry) ** 2 <= 1

  def blob(self, rng: np.random.Generator) -> np.ndarray:
    """bool (S, S): union of 1-3 ellipses."""
    shape = self.ellipse(rng, 0.1, 0.3)
    for _ in range(rng.integers(0, 3)):
      shape |= self.ellipse(rng, 0.08, 0.2)
    return shape

  def shape_of(self, name: str, rng: np.random.Generator) -> np.ndarray:
    """bool (S, S): the region of one class."""
    s = self.size
    if name == 'cloud_shadow':
      return self.ellipse(rng, 0.25, 0.5)
    if name == 'double_plant':
      u0, v0 = rng.uniform(self.u.min(), self.u.max()), rng.uniform(self.v.min(), self.v.max())
      hu, hv = rng.uniform(0.15 * s, 0.35 * s, size=2)
      return (np.abs(self.u - u0) < hu) & (np.abs(self.v - v0) < hv)
    if name == 'planter_skip':
      u0 = rng.uniform(np.percentile(self.u, 10), np.percentile(self.u, 90))
      return np.abs(self.u - u0) < 1.5 * self.period
    if name == 'waterway':
      a = rng.uniform(0, math.pi)
      p = self.x * math.cos(a) + self.y * math.sin(a)
      q = -self.x * math.sin(a) + self.y * math.cos(a)
      q0 = rng.uniform(q.min() + 0.2 * s, q.max() - 0.2 * s)
      centre = q0 + 0.12 * s * np.sin(2 * math.pi * p / (0.8 * s) + rng.uniform(0, 2 * math.pi))
      return np.abs(q - centre) < 0.09 * s
    if name == 'endrow':
      width = 0.2 * s
      edge = rng.integers(4)
      return (self.x, self.y, s - 1 - self.x, s - 1 - self.y)[edge] < width
    return self.blob(rng)


def render_tile(rng: np.random.Generator, size: int, names: Sequence[str]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Renders one synthetic tile.

  Args:
    rng: the tile's random generator.
    size: tile height = width S.
    names: class names, background first (C entries).
  Returns:
    rgbn uint8 (S, S, 4), boundary bool (S, S), mask bool (S, S), patterns bool (S, S, C-1).
  """
  frame = _Frame(size, rng.uniform(0, math.pi))
  image = np.where(frame.rows(frame.u, frame.period)[..., None],
                   np.float32(_CROP), np.float32(_SOIL))
  boundary = np.ones((size, size), bool)
  if rng.random() < 0.5:  # a straight field edge cuts off part of the tile
    a = rng.uniform(0, 2 * math.pi)
    p = (frame.x - size / 2) * math.cos(a) + (frame.y - size / 2) * math.sin(a)
    boundary = p < rng.uniform(0.1, 0.4) * size
  mask = np.ones((size, size), bool)
  if rng.random() < 0.3:  # a no-data rectangle on one side
    extent = int(rng.uniform(0.1, 0.3) * size)
    side = rng.integers(4)
    region = (frame.x < extent, frame.y < extent, frame.x >= size - extent,
              frame.y >= size - extent)[side]
    mask &= ~region

  patterns = np.zeros((size, size, len(names) - 1), bool)
  present = rng.random(len(names) - 1) < _CLASS_PROBABILITY
  if not present.any():
    present[rng.integers(len(names) - 1)] = True
  composed = {'cloud_shadow', 'weed_cluster'}
  order = [c for c in range(len(names) - 1) if names[c + 1] not in composed]
  order += [c for c in range(len(names) - 1) if names[c + 1] == 'weed_cluster']
  order += [c for c in range(len(names) - 1) if names[c + 1] == 'cloud_shadow']
  opaque = np.zeros((size, size), bool)  # painted by an earlier opaque class
  for c in order:
    if not present[c]:
      continue
    name = names[c + 1]
    shape = frame.shape_of(name, rng)
    if name not in composed:  # opaque patterns do not overlap, so every label stays visible
      shape &= ~opaque
      opaque |= shape
    patterns[..., c] = shape
    if name == 'cloud_shadow':
      image[shape] *= _SHADOW_FACTOR
    elif name == 'weed_cluster':
      speckle = shape & (rng.random((size, size)) < 0.6)
      image[speckle] = _COLOURS[name]
    elif name in _STRIPES:
      across = frame.v if name == 'endrow' else frame.u
      period = frame.period if name == 'endrow' else frame.period / 2
      colour_a, colour_b = _STRIPES[name]
      stripes = np.where(frame.rows(across, period)[..., None], np.float32(colour_a),
                         np.float32(colour_b))
      image[shape] = stripes[shape]
    else:
      image[shape] = _COLOURS[name]
  image[~boundary] = _OUTSIDE
  image += rng.normal(0, 6, image.shape).astype(np.float32)
  image[~mask] = 0
  patterns &= (boundary & mask)[..., None]
  return np.clip(np.rint(image), 0, 255).astype(np.uint8), boundary, mask, patterns


def _field_ids(rng: np.random.Generator, count: int) -> list[str]:
  ids: list[str] = []
  while len(ids) < count:
    field = ''.join(rng.choice(_ID_CHARS, 9))
    if field not in ids:
      ids.append(field)
  return ids


def _save_binary(array: np.ndarray, path: str) -> None:
  Image.fromarray(array.astype(np.uint8) * np.uint8(255), mode='L').save(path)


def generate(out_dir: str, num_train: int, num_val: int, num_test: int, size: int, seed: int,
             version: str = '2020') -> None:
  """Writes a deterministic synthetic dataset in the Agriculture-Vision layout into out_dir.

  Files: images/rgb/<id>.jpg (RGB JPEG), images/nir/<id>.jpg (single-channel 'L' JPEG),
  boundaries/<id>.png and masks/<id>.png ('L' PNG 0/255), labels/<class>/<id>.png ('L' PNG
  0/255, train and val only), plus synthetic.json with the parameters, the file count and the
  SHA-256 of every file (``verify`` checks them).
  Tiles are grouped four per field: <id> = FIELDID_x1-y1-x2-y2 on the field's tile grid.
  """
  names = layout.class_names(version)
  for field, value in (('num_train', num_train), ('num_val', num_val), ('num_test', num_test)):
    if value < 1:
      raise ValueError(f'data.synthetic.{field}={value} must be at least 1')
  if size < 16:
    raise ValueError(f'data.synthetic.size={size} must be at least 16')
  counts = {'train': num_train, 'val': num_val, 'test': num_test}
  num_fields = sum(math.ceil(n / 4) for n in counts.values())
  fields = _field_ids(np.random.default_rng([seed, 0]), num_fields)
  field_index = 0
  for split_index, (split, count) in enumerate(counts.items()):
    split_dir = os.path.join(out_dir, split)
    folders = [os.path.join(split_dir, 'images', 'rgb'), os.path.join(split_dir, 'images', 'nir'),
               os.path.join(split_dir, 'boundaries'), os.path.join(split_dir, 'masks')]
    if split in layout.LABELED_SPLITS:
      folders += [os.path.join(split_dir, 'labels', name) for name in names[1:]]
    for folder in folders:
      os.makedirs(folder)
    for i in range(count):
      field, cell = fields[field_index + i // 4], i % 4
      x1, y1 = (cell % 2) * size, (cell // 2) * size
      tile_id = f'{field}_{x1}-{y1}-{x1 + size}-{y1 + size}'
      rgbn, boundary, mask, patterns = render_tile(
          np.random.default_rng([seed, 1, split_index, i]), size, names)
      Image.fromarray(rgbn[..., :3], mode='RGB').save(
          os.path.join(folders[0], tile_id + '.jpg'), quality=95)
      Image.fromarray(rgbn[..., 3], mode='L').save(
          os.path.join(folders[1], tile_id + '.jpg'), quality=95)
      _save_binary(boundary, os.path.join(folders[2], tile_id + '.png'))
      _save_binary(mask, os.path.join(folders[3], tile_id + '.png'))
      if split in layout.LABELED_SPLITS:
        for c in range(len(names) - 1):
          _save_binary(patterns[..., c], os.path.join(folders[4 + c], tile_id + '.png'))
    field_index += math.ceil(count / 4)
  metadata = {'version': version, 'num_train': num_train, 'num_val': num_val,
              'num_test': num_test, 'size': size, 'seed': seed}
  checksums = _checksums(out_dir)
  metadata.update(file_count=len(checksums), sha256=checksums)
  with open(os.path.join(out_dir, METADATA_FILE), 'w') as f:
    json.dump(metadata, f, indent=2, sort_keys=True)


def _checksums(root: str) -> dict[str, str]:
  """Relative path ('/'-separated) -> SHA-256 hex of every file under root but synthetic.json."""
  checksums = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, root).replace(os.sep, '/')
      if relative != METADATA_FILE:
        with open(path, 'rb') as f:
          checksums[relative] = hashlib.sha256(f.read()).hexdigest()
  return dict(sorted(checksums.items()))


def verify(data_dir: str, metadata: dict) -> None:
  """Checks that data_dir holds exactly the files synthetic.json lists, with their checksums.

  Raises:
    ValueError: naming data.data_dir and the first missing, extra or changed file.
  """
  recorded = metadata.get('sha256')
  if not isinstance(recorded, dict) or metadata.get('file_count') != len(recorded):
    problem = f'its {METADATA_FILE} records no file checksums'
  else:
    found = _checksums(data_dir)
    missing = sorted(set(recorded) - set(found))
    extra = sorted(set(found) - set(recorded))
    changed = [name for name in recorded if name in found and found[name] != recorded[name]]
    problem = (f'file {missing[0]} is missing' if missing else
               f'file {extra[0]} is not part of it' if extra else
               f'file {changed[0]} differs from its recorded SHA-256' if changed else '')
  if problem:
    raise ValueError(f'data.data_dir={data_dir!r} is not the synthetic dataset its '
                     f'{METADATA_FILE} describes: {problem} ({len(recorded or ())} files '
                     'recorded); delete the folder to have it generated again')


def ensure_synthetic(data_dir: str, num_train: int, num_val: int, num_test: int, size: int,
                     seed: int, version: str = '2020') -> None:
  """Generates the synthetic dataset into data_dir unless it is already there.

  Atomic and safe when several processes call it at once: each writes into its own temporary
  folder next to data_dir and renames it; the losers of the race delete theirs. An existing
  dataset made with other parameters, a non-empty folder that is no synthetic dataset, or one
  whose files differ from the count and checksums in its synthetic.json (``verify``) raises
  ValueError naming data.data_dir; nothing is deleted or regenerated over it.
  """
  wanted = {'version': version, 'num_train': num_train, 'num_val': num_val,
            'num_test': num_test, 'size': size, 'seed': seed}
  metadata_path = os.path.join(data_dir, METADATA_FILE)
  if not os.path.exists(metadata_path):
    if os.path.isdir(data_dir) and os.listdir(data_dir):
      raise ValueError(f'data.data_dir={data_dir!r} is not empty and holds no {METADATA_FILE}: '
                       'it is not a synthetic dataset; choose an empty or absent folder')
    tmp = staging.staging_dir(data_dir)
    try:
      generate(tmp, num_train, num_val, num_test, size, seed, version)
      os.rename(tmp, data_dir)
    except OSError as err:
      if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
        raise
    finally:
      if os.path.isdir(tmp):
        shutil.rmtree(tmp)
  with open(metadata_path) as f:
    metadata = json.load(f)
  found = {key: metadata.get(key) for key in wanted}
  if found != wanted:
    raise ValueError(f'data.data_dir={data_dir!r} holds a synthetic dataset made with {found}, '
                     f'not the configured data.synthetic / data.version {wanted}')
  verify(data_dir, metadata)


def main(argv: Sequence[str] | None = None) -> None:
  """Command line entry: writes the dataset (atomically) and prints a summary."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--num_train', type=int, default=64)
  parser.add_argument('--num_val', type=int, default=16)
  parser.add_argument('--num_test', type=int, default=16)
  parser.add_argument('--size', type=int, default=64)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--version', default='2020', choices=sorted(layout.CLASS_NAMES))
  args = parser.parse_args(argv)
  ensure_synthetic(args.out_dir, args.num_train, args.num_val, args.num_test, args.size,
                   args.seed, args.version)
  print(f'synthetic Agriculture-Vision {args.version} in {args.out_dir}: '
        f'{args.num_train} train, {args.num_val} val, {args.num_test} test tiles of '
        f'{args.size}x{args.size}')


if __name__ == '__main__':
  main()
