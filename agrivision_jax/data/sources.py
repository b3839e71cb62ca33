"""Random-access sources of Agriculture-Vision examples: the download folder and TFDS ArrayRecord.

An example is {'image': uint8 (H, W, 4) R,G,B,NIR; 'labels': uint8 (H, W, C) 0/1 multi-hot with
background; 'valid': bool (H, W); 'id': str}. Both sources decode with layout.decode_tile, so
they give identical examples for the same id. Sources are picklable (grain worker processes).
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import ml_collections

from agrivision_jax.data import layout

SOURCES = ('synthetic', 'directory', 'tfds')
PREPARE_COMMAND = ('python -m agrivision_jax.data.prepare --manual_dir=ROOT --data_dir={} '
                   '--version={}')


class DirectorySource:
  """Random access straight over the Agriculture-Vision folders of one split.

  Missing files are found when the source is built. Undecodable files, wrong sizes and
  non-binary PNGs raise (BadFileError naming the file) when the example is read under
  on_bad_example='error'; under 'skip' every tile is decoded once when the source is built, and
  the bad ones are left out, logged (count and files) and listed in ``skipped``.
  """

  def __init__(self, root: str, split: str, version: str, image_size: int,
               on_bad_example: str = 'error', num_threads: int | None = None):
    """Args: root: folder holding the splits; split: train|val|test; version: 2020|2021;
    image_size: expected tile size; on_bad_example: error|skip; num_threads: threads decoding
    tiles for the 'skip' check (default: CPU count)."""
    self._names = layout.class_names(version)
    self._image_size = image_size
    tiles, bad = layout.list_tiles(root, split, version, on_bad_example)
    if on_bad_example == 'skip':
      with concurrent.futures.ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool:
        checks = list(pool.map(self._check, tiles))
      bad += [b for b in checks if b is not None]
      tiles = [t for t, b in zip(tiles, checks) if b is None]
      layout.report_skipped(bad, f'{root} split {split}')
      if not tiles:
        raise ValueError(f'split {split!r} of {root}: every tile is bad ({len(bad)} skipped)')
    self._tiles = tiles
    self.skipped: tuple[layout.BadExample, ...] = tuple(bad)

  def _check(self, files: layout.TileFiles) -> layout.BadExample | None:
    try:
      layout.read_tile(files, self._names, self._image_size)
    except layout.BadFileError as err:
      return layout.BadExample(files.id, err.path, str(err))
    return None

  @property
  def ids(self) -> list[str]:
    """Tile ids in index order (sorted)."""
    return [t.id for t in self._tiles]

  def __len__(self) -> int:
    return len(self._tiles)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return layout.read_tile(self._tiles[index], self._names, self._image_size)

  def __repr__(self) -> str:
    return f'DirectorySource({len(self)} tiles)'


class TfdsSource:
  """Random access over the `agriculture_vision` TFDS ArrayRecord files of one split."""

  def __init__(self, data_dir: str, split: str, version: str, image_size: int):
    """Args: data_dir: TFDS data_dir that prepare wrote; split: train|val|test;
    version: 2020|2021 (the builder config); image_size: expected tile size."""
    self._names = layout.class_names(version)
    layout.check_split(split)
    self._data_dir, self._split, self._version = data_dir, split, version
    self._image_size = image_size
    builder = self._builder()
    if not builder.is_prepared():
      raise FileNotFoundError(
          f'data.data_dir={data_dir!r} holds no prepared agriculture_vision/{version}; build it '
          f'with: {PREPARE_COMMAND.format(data_dir, version)}')
    built_size = builder.info.metadata['image_size']
    if built_size != image_size:
      raise ValueError(f'agriculture_vision/{version} in {data_dir} has {built_size} px tiles, '
                       f'data.image_size={image_size}')
    if split not in builder.info.splits:
      raise ValueError(f'split {split!r} is not in agriculture_vision/{version} in {data_dir} '
                       f'(splits: {sorted(builder.info.splits)})')
    if builder.info.splits[split].num_examples == 0:
      raise ValueError(f'split {split!r} of agriculture_vision/{version} in {data_dir} is empty')
    self._records = None

  def _builder(self):
    # Imported here: the builder module imports tensorflow_datasets, which only this source needs.
    from agrivision_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    return tfds_builder.AgricultureVision(config=self._version, data_dir=self._data_dir,
                                          image_size=self._image_size)

  def _data_source(self):
    if self._records is None:
      self._records = self._builder().as_data_source(split=self._split)
    return self._records

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, '_records': None}

  def __len__(self) -> int:
    return len(self._data_source())

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self._data_source()[index]
    tile_id = record['id'].decode()
    where = f'{self._data_dir} agriculture_vision/{self._version} {self._split} record {tile_id}'
    names = {key: f'{where} field {key!r}' for key in ('rgb', 'nir', 'boundary', 'mask')}
    names['labels'] = [f'{where} field labels/{c}' for c in self._names[1:]]
    blobs = {key: record[key] for key in ('rgb', 'nir', 'boundary', 'mask')}
    blobs['labels'] = list(record['labels'])
    return layout.decode_tile(tile_id, blobs, self._names, self._image_size, names)

  def __repr__(self) -> str:
    return f'TfdsSource(agriculture_vision/{self._version} {self._split}, {len(self)} tiles)'


def create_source(data_config: ml_collections.ConfigDict, split: str
                  ) -> DirectorySource | TfdsSource:
  """Random-access source of one split as configured by config.data.

  Args:
    data_config: config.data (source, data_dir, version, image_size, on_bad_example, synthetic),
      as checked by agrivision_jax.configuration.validate.
    split: 'train', 'val' or 'test'.
  Returns:
    a source with len() and [index] -> example dict (see the module docstring). For source
    'synthetic' the dataset is first generated into data_config.data_dir if absent.
  """
  source, version = data_config.source, data_config.version
  layout.check_split(split)
  if source == 'tfds':
    return TfdsSource(data_config.data_dir, split, version, data_config.image_size)
  if source == 'synthetic':
    # Imported here so that `python -m agrivision_jax.data.synthetic` does not find the module
    # already imported by the package (runpy warns about that).
    from agrivision_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    syn = data_config.synthetic
    synthetic.ensure_synthetic(data_config.data_dir, syn.num_train, syn.num_val, syn.num_test,
                               syn.size, syn.seed, version)
  return DirectorySource(data_config.data_dir, split, version, data_config.image_size,
                         data_config.on_bad_example)
