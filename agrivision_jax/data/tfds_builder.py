"""TFDS builder `agriculture_vision` (configs '2020' and '2021'), built and read without TensorFlow.

Each record stores the raw bytes of a tile's files, so decoding a record runs the very code that
decodes the download (layout.decode_tile) and both sources give identical examples:

  id        Text     FIELDID_x1-y1-x2-y2
  rgb, nir  bytes    the RGB and NIR JPEG files
  boundary  bytes    boundaries/<id>.png
  mask      bytes    masks/<id>.png
  labels    bytes[]  labels/<class>/<id>.png in class_names(version)[1:] order (empty for test)

Every tile is fully decoded and validated while building (bad tiles raise, or are left out and
reported under on_bad_example='skip'). Build with `python -m agrivision_jax.data.prepare`.
"""
from __future__ import annotations

import concurrent.futures
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from agrivision_jax import progress as progress_lib
from agrivision_jax.data import layout

_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)


class AgricultureVision(tfds.core.GeneratorBasedBuilder):
  """Agriculture-Vision aerial farmland tiles (RGB + NIR) with multi-label field patterns."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Raw tile files stored as bytes in ArrayRecord.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='2020', description='CVPR 2020 challenge release, 6 patterns'),
      tfds.core.BuilderConfig(name='2021', description='CVPR 2021 challenge release, 8 patterns'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Download Agriculture-Vision from https://www.agriculture-vision.com and pass the folder '
      'holding train/, val/ and test/ as manual_dir (or use the synthetic dataset: '
      'python -m agrivision_jax.data.synthetic).')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    """No checksums file next to the code (manual download). TFDS's own lookup of the code
    path needs the `importlib_resources` backport, which Python >= 3.9 does not install."""
    return None

  def __init__(self, *, image_size: int = 512, on_bad_example: str = 'error',
               num_threads: int | None = None, **kwargs):
    """Args: image_size: expected tile size; on_bad_example: 'error' | 'skip'; num_threads:
    threads that read and validate tiles while building (default: CPU count); kwargs: TFDS."""
    self._image_size = image_size
    self._on_bad_example = on_bad_example
    self._num_threads = num_threads or os.cpu_count() or 1
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'id': tfds.features.Text(), 'rgb': _BYTES, 'nir': _BYTES, 'boundary': _BYTES,
            'mask': _BYTES, 'labels': tfds.features.Sequence(_BYTES)}),
        metadata=tfds.core.MetadataDict(
            image_size=self._image_size,
            class_names=list(layout.class_names(self.builder_config.name))),
        homepage='https://www.agriculture-vision.com',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = os.fspath(dl_manager.manual_dir)
    splits = [s for s in layout.SPLITS if os.path.isdir(os.path.join(root, s))]
    if not splits:
      raise FileNotFoundError(f'manual_dir {root} holds none of the split folders {layout.SPLITS}')
    logging.info('agriculture_vision/%s: building splits %s from %s', self.builder_config.name,
                 splits, root)
    return {split: self._generate_examples(root, split) for split in splits}

  def _generate_examples(self, root: str, split: str) -> Iterator[tuple[str, dict]]:
    version = self.builder_config.name
    names = layout.class_names(version)
    tiles, bad = layout.list_tiles(root, split, version, self._on_bad_example)

    def load(files: layout.TileFiles
             ) -> tuple[layout.TileFiles, dict | None, layout.BadExample | None]:
      blobs = layout.read_bytes(files)
      try:
        layout.decode_tile(files.id, blobs, names, self._image_size, files.where())
      except layout.BadFileError as err:
        if self._on_bad_example == 'error':
          raise
        return files, None, layout.BadExample(files.id, err.path, str(err))
      return files, blobs, None

    progress = progress_lib.Progress(f'agriculture_vision/{version} {split}', len(tiles),
                                    interval_s=5.0)
    written = 0
    chunk = 8 * self._num_threads  # bounds the tile bytes held in memory
    with concurrent.futures.ThreadPoolExecutor(self._num_threads) as pool:
      for start in range(0, len(tiles), chunk):
        for files, blobs, bad_example in pool.map(load, tiles[start:start + chunk]):
          if bad_example is not None:
            bad.append(bad_example)
          else:
            written += 1
            yield files.id, {'id': files.id, **blobs}
        progress.update(min(start + chunk, len(tiles)) - start)
    progress.finish()
    layout.report_skipped(bad, f'agriculture_vision/{version} {split}')
    if not written:
      raise ValueError(f'split {split!r} of {root}: every tile is bad, nothing to build')
