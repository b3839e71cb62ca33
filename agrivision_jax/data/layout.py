"""Agriculture-Vision directory layout: class lists, tile listing and decoding of one tile.

Layout of one split (the download as released, no preparation step)::

    <root>/<split>/images/rgb/<id>.jpg       RGB JPEG (H, W, 3)
    <root>/<split>/images/nir/<id>.jpg       NIR JPEG, single channel (H, W)
    <root>/<split>/boundaries/<id>.png       field boundary, 0/255
    <root>/<split>/masks/<id>.png            valid-data mask, 0/255
    <root>/<split>/labels/<class>/<id>.png   one 0/255 PNG per pattern class (train and val only)

``<id>`` is ``FIELDID_x1-y1-x2-y2``. Every decoder here works on the raw file bytes so that the
directory source and the TFDS source (which stores the same bytes) produce identical examples.
"""
from __future__ import annotations

import dataclasses
import io
import os
from typing import Mapping, Sequence

import numpy as np
from absl import logging
from PIL import Image

CLASS_NAMES: Mapping[str, tuple[str, ...]] = {
    '2020': ('background', 'cloud_shadow', 'double_plant', 'planter_skip', 'standing_water',
             'waterway', 'weed_cluster'),
    '2021': ('background', 'double_plant', 'drydown', 'endrow', 'nutrient_deficiency',
             'planter_skip', 'water', 'waterway', 'weed_cluster'),
}
SPLITS = ('train', 'val', 'test')
LABELED_SPLITS = ('train', 'val')
BAD_EXAMPLE_POLICIES = ('error', 'skip')


def class_names(version: str) -> tuple[str, ...]:
  """Class names of a dataset release, background first.

  Args:
    version: '2020' (7 classes, the paper's data) or '2021' (9 classes).
  Returns:
    tuple of C class names; index c is channel c of the multi-hot labels (H, W, C).
  """
  if version not in CLASS_NAMES:
    raise ValueError(f'data.version={version!r} is unknown; expected one of {sorted(CLASS_NAMES)}')
  return CLASS_NAMES[version]


def check_split(split: str) -> None:
  """Raises ValueError naming the split unless it is one of SPLITS."""
  if split not in SPLITS:
    raise ValueError(f'split={split!r} is unknown; expected one of {SPLITS}')


@dataclasses.dataclass(frozen=True)
class TileFiles:
  """Paths of the files of one tile; ``labels`` follows class_names(version)[1:], empty for test."""
  id: str
  rgb: str
  nir: str
  boundary: str
  mask: str
  labels: tuple[str, ...]

  def where(self) -> dict[str, str | tuple[str, ...]]:
    """The file names that decode_tile puts in its error messages."""
    return {'rgb': self.rgb, 'nir': self.nir, 'boundary': self.boundary, 'mask': self.mask,
            'labels': self.labels}


class BadFileError(ValueError):
  """A file that cannot be decoded or holds invalid content; ``path`` names it."""

  def __init__(self, path: str, message: str):
    super().__init__(f'{path}: {message}')
    self.path = path
    self.message = message

  def __reduce__(self):
    # Pickled with both arguments, so the error crosses grain worker processes intact.
    return type(self), (self.path, self.message)


@dataclasses.dataclass(frozen=True)
class BadExample:
  """A tile left out under on_bad_example='skip': the offending file and why."""
  id: str
  path: str
  reason: str


def _listdir_stems(folder: str, suffix: str) -> set[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'folder {folder} does not exist')
  return {name[:-len(suffix)] for name in os.listdir(folder) if name.endswith(suffix)}


def list_tiles(root: str, split: str, version: str, on_bad_example: str = 'error'
               ) -> tuple[list[TileFiles], list[BadExample]]:
  """Lists the tiles of a split and checks that every file of every tile exists.

  Only the file system is consulted (no decoding). A missing folder, an unknown version or split
  and an empty split always raise; a missing file of one tile raises FileNotFoundError naming it
  under 'error' and is reported in the returned bad list under 'skip'.

  Args:
    root: dataset root holding the split folders.
    split: 'train', 'val' or 'test'.
    version: '2020' or '2021' (selects the label folders).
    on_bad_example: 'error' or 'skip'.
  Returns:
    (tiles sorted by id, bad examples).
  """
  names = class_names(version)
  check_split(split)
  if on_bad_example not in BAD_EXAMPLE_POLICIES:
    raise ValueError(f'data.on_bad_example={on_bad_example!r} is unknown; '
                     f'expected one of {BAD_EXAMPLE_POLICIES}')
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise FileNotFoundError(f'split folder {split_dir} does not exist (data.data_dir={root!r})')
  folders = {'rgb': (os.path.join(split_dir, 'images', 'rgb'), '.jpg'),
             'nir': (os.path.join(split_dir, 'images', 'nir'), '.jpg'),
             'boundary': (os.path.join(split_dir, 'boundaries'), '.png'),
             'mask': (os.path.join(split_dir, 'masks'), '.png')}
  if split in LABELED_SPLITS:
    for name in names[1:]:
      folders[name] = (os.path.join(split_dir, 'labels', name), '.png')
  present = {key: _listdir_stems(folder, suffix) for key, (folder, suffix) in folders.items()}
  # A tile is any id with at least one file, so a tile missing its RGB image is reported too.
  ids = sorted(set().union(*present.values()))
  if not ids:
    raise ValueError(f'split {split!r} is empty: {folders["rgb"][0]} holds no .jpg tile')

  def path(key: str, tile_id: str) -> str:
    folder, suffix = folders[key]
    return os.path.join(folder, tile_id + suffix)

  tiles, bad = [], []
  for tile_id in ids:
    missing = [path(key, tile_id) for key in folders if tile_id not in present[key]]
    if missing:
      if on_bad_example == 'error':
        raise FileNotFoundError(f'tile {tile_id}: file {missing[0]} does not exist')
      bad.append(BadExample(tile_id, missing[0], 'file does not exist'))
      continue
    labels = tuple(path(name, tile_id) for name in names[1:]) if split in LABELED_SPLITS else ()
    tiles.append(TileFiles(tile_id, path('rgb', tile_id), path('nir', tile_id),
                           path('boundary', tile_id), path('mask', tile_id), labels))
  return tiles, bad


def report_skipped(bad: Sequence[BadExample], what: str) -> None:
  """Logs the count and the files of the tiles left out under on_bad_example='skip'."""
  if bad:
    logging.warning('%s: skipped %d bad tiles (data.on_bad_example=skip):\n%s', what, len(bad),
                    '\n'.join(f'  {b.path}: {b.reason}' for b in bad))


def read_bytes(files: TileFiles) -> dict[str, bytes | list[bytes]]:
  """Reads the raw bytes of a tile's files.

  Returns:
    {'rgb', 'nir', 'boundary', 'mask': bytes, 'labels': list of bytes in class order}.
  """
  def read(path: str) -> bytes:
    with open(path, 'rb') as f:
      return f.read()
  return {'rgb': read(files.rgb), 'nir': read(files.nir), 'boundary': read(files.boundary),
          'mask': read(files.mask), 'labels': [read(p) for p in files.labels]}


def _decode(data: bytes, where: str, mode: str, image_size: int) -> np.ndarray:
  """Fully decodes one image (PIL load(), so truncated files fail) and checks its size."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      size = image.size
      array = np.asarray(image.convert(mode))
  except (OSError, SyntaxError, Image.DecompressionBombError) as err:
    raise BadFileError(where, f'cannot decode image ({err})') from err
  if size != (image_size, image_size):
    raise BadFileError(where, f'image size {size[0]}x{size[1]} differs from '
                       f'data.image_size={image_size}')
  return array


def _decode_binary(data: bytes, where: str, image_size: int) -> np.ndarray:
  """Decodes a 0/255 PNG to a bool (H, W) array; any other value raises naming the file."""
  array = _decode(data, where, 'L', image_size)
  if np.any((array != 0) & (array != 255)):
    values = np.unique(array)
    other = values[(values != 0) & (values != 255)]
    raise BadFileError(where, f'binary PNG holds values {other[:8].tolist()} other than 0/255')
  return array == 255


def decode_tile(tile_id: str, blobs: Mapping[str, bytes | Sequence[bytes]],
                names: Sequence[str], image_size: int,
                where: Mapping[str, str | Sequence[str]]) -> dict[str, np.ndarray | str]:
  """Decodes and validates the raw bytes of one tile into an example.

  Args:
    tile_id: the tile id.
    blobs: {'rgb', 'nir', 'boundary', 'mask': bytes, 'labels': C-1 bytes (empty for test)}.
    names: class names, background first (C entries).
    image_size: expected height = width of every file.
    where: the same keys as blobs, naming each file (path or record) in error messages.
  Returns:
    {'image': uint8 (H, W, 4) R,G,B,NIR; 'labels': uint8 (H, W, C) 0/1 multi-hot, background
     set where no pattern is (all zero for the unlabelled test split); 'valid': bool (H, W) =
     boundary AND mask; 'id': str}.
  """
  rgb = _decode(blobs['rgb'], where['rgb'], 'RGB', image_size)
  nir = _decode(blobs['nir'], where['nir'], 'L', image_size)
  valid = (_decode_binary(blobs['boundary'], where['boundary'], image_size)
           & _decode_binary(blobs['mask'], where['mask'], image_size))
  if blobs['labels']:
    if len(blobs['labels']) != len(names) - 1:
      raise ValueError(f'tile {tile_id}: {len(blobs["labels"])} label images for '
                       f'{len(names) - 1} classes {tuple(names[1:])}')
    patterns = [_decode_binary(data, label_where, image_size)
                for data, label_where in zip(blobs['labels'], where['labels'])]
    background = ~np.logical_or.reduce(patterns)
    labels = np.stack([background] + patterns, axis=-1).view(np.uint8)
  else:
    labels = np.zeros((image_size, image_size, len(names)), np.uint8)
  image = np.concatenate([rgb, nir[..., None]], axis=-1)
  return {'image': image, 'labels': labels, 'valid': valid, 'id': tile_id}


def read_tile(files: TileFiles, names: Sequence[str], image_size: int
              ) -> dict[str, np.ndarray | str]:
  """Reads, decodes and validates one tile from its files (see decode_tile for the example)."""
  return decode_tile(files.id, read_bytes(files), names, image_size, files.where())
