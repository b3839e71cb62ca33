"""Whole-field inference: any-size RGB + NIR field images in, georeferenced class maps out.

``--mode=field`` runs the workdir's model over every field in ``config.field.inputs`` with
sliding windows of ``config.data.image_size`` pixels that overlap by ``config.field.overlap``.
Each window's logits (TTA-averaged as in predict) are weighted by a separable ramp that is 1 in
the window's middle and falls as a raised cosine over the ``overlap`` pixels at its edges
(strictly positive), summed, and the class map is the argmax of the sum: no seams. Pixels outside
the image and nodata pixels are 255.

Memory: one window row (a strip of image_size rows) of input and of summed logits is held at a
time; finished rows are argmaxed and streamed to the writer (docs/field.md).

Outputs go to a local folder or a URL (gs://...) through ``etils.epath``. The class map writers
(tifffile, rasterio, PIL) need a local file: for a URL output folder the class map is written to a
temporary file under ``tempfile.gettempdir()`` (which must have room for it) and copied up when
complete (``_write_class_map``).
"""

import functools
import json
import math
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from agrivision_jax import data as data_lib
from agrivision_jax import experiment
from agrivision_jax import field_io
from agrivision_jax import overlay
from agrivision_jax import tta as tta_lib
from agrivision_jax import workdir as workdir_lib
from agrivision_jax.data import BadFileError
from agrivision_jax.progress import Progress

NODATA_CLASS = 255
# The overlay figure's panels are ~300 px wide: its pictures are subsampled to this side at most.
FIGURE_PIXELS = 600


def parse_inputs(inputs: str) -> list[tuple[str, ...]]:
  """'a.tif,rgb.png+nir.png' -> [('a.tif',), ('rgb.png', 'nir.png')]: fields separated by commas,
  the files of one field (read as one image, bands in file order) joined by '+'."""
  fields = [tuple(p.strip() for p in item.split('+')) for item in inputs.split(',') if item.strip()]
  if not fields or any(not p for field in fields for p in field):
    raise ValueError(f"config.field.inputs must list field images ('field.tif' or "
                     f"'rgb.tif+nir.tif', comma-separated), got {inputs!r}")
  return fields


def window_origins(length: int, tile: int, overlap: int) -> np.ndarray:
  """Top (or left) offsets k * (tile - overlap) of the fewest windows that cover [0, length);
  the last may run past the end (that part is padded with zeros)."""
  stride = tile - overlap
  return np.arange(max(1, math.ceil((length - overlap) / stride))) * stride


def window_weight(tile: int, overlap: int) -> np.ndarray:
  """(tile, tile) float32 separable blending weight: 1 inside, a raised cosine
  sin^2(pi/2 * (d + 0.5) / overlap) over the ``overlap`` pixels nearest an edge (d = distance to
  the edge), so two windows that overlap by ``overlap`` have weights summing to 1 there."""
  distance = np.minimum(np.arange(tile), np.arange(tile)[::-1]).astype(np.float64)
  ramp = (np.sin(np.pi / 2 * np.minimum((distance + 0.5) / max(overlap, 1), 1.0)) ** 2
          if overlap else np.ones(tile))
  return np.outer(ramp, ramp).astype(np.float32)


class FieldSource:
  """One field: its image files opened as a single image of R, G, B, NIR bands plus a valid mask.

  Args:
    paths: the field's files; their bands, concatenated in order, are named by ``band_order``.
    band_order: one letter per band (``configuration.BAND_LETTERS``), e.g. 'RGBN', 'BGRNA', 'RGB' + 'N'.
    nodata: >= 0: a pixel whose R, G, B, N bands all equal it is nodata; -1: each band's file
      nodata tag, 0 where untagged. A pixel with alpha 0 is nodata too.
    backend: 'rasterio' or 'tifffile' (``field_io.open_raster``).

  Raises:
    FileNotFoundError / BadFileError (ValueError): naming the file that is missing, unreadable,
      of another size than the first, or whose band count does not match ``band_order``.
  """

  def __init__(self, paths: Sequence[str], band_order: str, nodata: float, backend: str):
    self.paths, self.backend = tuple(paths), backend
    self.rasters = []
    for path in self.paths:
      self.rasters.append(field_io.open_raster(path, backend))
    first = self.rasters[0]
    self.height, self.width = first.height, first.width
    letters = iter(band_order)
    self._bands = []   # (raster, band index, letter, nodata value)
    for raster in self.rasters:
      if (raster.height, raster.width) != (self.height, self.width):
        raise BadFileError(raster.path, f'{raster.width}x{raster.height} pixels, but '
                           f'{first.path} is {self.width}x{self.height}: the files of a field '
                           'must cover the same pixel grid')
      for band in range(raster.count):
        tag = raster.nodata[band]
        value = nodata if nodata >= 0 else (0 if tag is None else tag)
        self._bands.append((raster, band, next(letters, '?'), value))
    if len(self._bands) != len(band_order):
      counts = ' + '.join(f'{r.count} ({r.path})' for r in self.rasters)
      raise BadFileError('+'.join(self.paths), f'{counts} bands, but config.field.band_order='
                         f'{band_order!r} names {len(band_order)}')
    self.georef = next((r.georef for r in self.rasters if r.georef is not None), None)
    self.is_tiff = first.is_tiff

  def read_rows(self, y0: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [y0, y1) as (image (h, W, 4) uint8 R, G, B, NIR (0 where absent or nodata),
    valid (h, W) bool)."""
    image = np.zeros((y1 - y0, self.width, 4), np.uint8)
    at_nodata = np.ones((y1 - y0, self.width), bool)
    alpha = np.ones_like(at_nodata)
    for raster in self.rasters:
      rows = raster.read_rows(y0, y1)
      for r, band, letter, value in self._bands:
        if r is not raster or letter == 'X':
          continue
        if letter == 'A':
          alpha &= rows[..., band] != 0
          continue
        image[..., 'RGBN'.index(letter)] = rows[..., band]
        at_nodata &= rows[..., band] == value
    valid = alpha & ~at_nodata
    image[~valid] = 0
    return image, valid

  def close(self) -> None:
    """Closes the files."""
    for raster in self.rasters:
      raster.close()


@functools.lru_cache(maxsize=8)
def _jitted_forward(model: nn.Module, mesh: jax.sharding.Mesh, tta: str) -> Callable:
  data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())

  def forward(variables, weight, images):
    apply = functools.partial(model.apply, variables, train=False)
    return tta_lib.tta_logits(apply, images, tta) * weight[None, :, :, None]

  return jax.jit(forward, in_shardings=(replicated, replicated, data), out_shardings=data)


def make_forward(model: nn.Module, variables: Any, mesh: jax.sharding.Mesh, tta: str,
                 weight: np.ndarray) -> Callable[[np.ndarray], jax.Array]:
  """Returns ``images (B, T, T, Cin) float32 normalised -> weight * TTA logits (B, T, T, C)``,
  jitted with the batch split over the mesh's 'data' axis (B divisible by its size)."""
  tta_lib.transforms_for(tta)
  forward = _jitted_forward(model, mesh, tta)
  return functools.partial(forward, variables, jnp.asarray(weight))


def infer_field(source: FieldSource, forward: Callable[[np.ndarray], jax.Array], *, tile: int,
                overlap: int, batch_size: int, modality: str,
                progress: Callable[[int], None] = lambda count: None
                ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Sliding-window class map of a field, yielded top to bottom one window row at a time.

  Args:
    source: the field.
    forward: from ``make_forward`` (its weight made by ``window_weight(tile, overlap)``).
    tile, overlap: window size and overlap in pixels (0 <= overlap < tile).
    batch_size: windows per forward call (partial batches are zero-padded).
    modality: 'nrgb' | 'rgb' | 'nir', the model's input (``data.normalize``).
    progress: called with the number of windows done (windows without a valid pixel are skipped).

  Yields:
    (class map rows (h, W) uint8, 255 where nodata; their image (h, W, 4) uint8 R, G, B, NIR).
  """
  height, width = source.height, source.width
  rows, columns = window_origins(height, tile, overlap), window_origins(width, tile, overlap)
  padded_width, stride = int(columns[-1]) + tile, tile - overlap
  summed = None
  for index, top in enumerate(rows):
    bottom = min(top + tile, height)
    image = np.zeros((tile, padded_width, 4), np.uint8)
    valid = np.zeros((tile, padded_width), bool)
    image[:bottom - top, :width], valid[:bottom - top, :width] = source.read_rows(top, bottom)
    active = [left for left in columns if valid[:, left:left + tile].any()]
    inflight = deque()

    def accumulate(keep: int) -> None:
      nonlocal summed
      while len(inflight) > keep:
        lefts, logits = inflight.popleft()
        logits = np.asarray(logits)
        if summed is None:
          summed = np.zeros((tile, padded_width, logits.shape[-1]), np.float32)
        for k, left in enumerate(lefts):
          summed[:, left:left + tile] += logits[k]
        progress(len(lefts))

    for start in range(0, len(active), batch_size):
      lefts = active[start:start + batch_size]
      windows = np.zeros((batch_size, tile, tile, 4), np.uint8)
      for k, left in enumerate(lefts):
        windows[k] = image[:, left:left + tile]
      inflight.append((lefts, forward(data_lib.normalize(windows, modality))))
      accumulate(keep=1)
    accumulate(keep=0)
    progress(len(columns) - len(active))
    finished = (min(stride, height - top) if index + 1 < len(rows) else bottom - top)
    if summed is None:
      classes = np.full((finished, width), NODATA_CLASS, np.uint8)
    else:
      classes = np.argmax(summed[:finished, :width], axis=-1).astype(np.uint8)
      classes[~valid[:finished, :width]] = NODATA_CLASS
      summed[:tile - stride] = summed[stride:]
      summed[tile - stride:] = 0
    yield classes, image[:finished, :width]


class _Summary:
  """Collects class counts and a nearest-neighbour preview (every ``step``-th row and column) of
  the row blocks streaming through it."""

  def __init__(self, height: int, width: int, preview_size: int):
    self.step = max(1, math.ceil(max(height, width) / preview_size))
    self.counts = np.zeros(256, np.int64)
    self.classes, self.images = [], []
    self._top = 0

  def watch(self, blocks: Iterator[tuple[np.ndarray, np.ndarray]]) -> Iterator[np.ndarray]:
    """Passes the class rows of ``infer_field``'s blocks through, recording them."""
    for classes, image in blocks:
      self.counts += np.bincount(classes.ravel(), minlength=256)
      rows = slice((-self._top) % self.step, None, self.step)
      self.classes.append(classes[rows, ::self.step].copy())   # copies: views keep the strips
      self.images.append(image[rows, ::self.step].copy())
      self._top += classes.shape[0]
      yield classes


def _write_previews(stem: str, out_dir: epath.Path, summary: _Summary,
                    class_names: Sequence[str]) -> tuple[str, str]:
  """Writes <stem>_preview.png (RGB with the non-background classes blended in, nodata grey) and
  <stem>_overlay.png (RGB | NIR | prediction with legend); returns their paths."""
  classes, image = np.concatenate(summary.classes), np.concatenate(summary.images)
  valid = classes != NODATA_CLASS
  shown = np.where(valid, classes, 0)
  colours = overlay.colourise(shown, len(class_names), valid)
  blend = np.where((valid & (shown > 0))[..., None],
                   (image[..., :3].astype(np.uint16) + colours) // 2, image[..., :3])
  blend = np.where(valid[..., None], blend, colours).astype(np.uint8)
  preview = out_dir / f'{stem}_preview.png'
  overlay.save_png(preview, Image.fromarray(blend))
  figure = out_dir / f'{stem}_overlay.png'
  step = max(1, math.ceil(max(shown.shape) / FIGURE_PIXELS))
  overlay.save_overlay(figure, image[::step, ::step], shown[::step, ::step],
                       valid[::step, ::step], class_names, title=stem)
  return str(preview), str(figure)


def _write_class_map(path: epath.Path, blocks: Iterator[np.ndarray], source: FieldSource) -> None:
  """``field_io.write_class_map`` to ``path``, local or a URL.

  tifffile, rasterio and PIL write local files only: for a URL (its str has '://') the map is
  written to a temporary file under ``tempfile.gettempdir()``, copied to ``path`` with
  ``epath`` (overwriting) once complete, and the temporary file removed.
  """
  def write(local: str) -> None:
    field_io.write_class_map(local, blocks, source.height, source.width, source.georef,
                             source.backend, NODATA_CLASS)

  if '://' not in str(path):
    write(os.fspath(path))
    return
  handle, local = tempfile.mkstemp(prefix=f'{path.stem}_', suffix=path.suffix,
                                   dir=tempfile.gettempdir())
  os.close(handle)
  try:
    write(local)
    epath.Path(local).copy(path, overwrite=True)
  finally:
    os.remove(local)


def predict_field(source: FieldSource, forward: Callable[[np.ndarray], jax.Array],
                  config: ml_collections.ConfigDict, out_dir: str | os.PathLike, stem: str,
                  class_names: Sequence[str]) -> dict[str, Any]:
  """Runs ``infer_field`` on one field and writes its class map, previews and JSON summary into
  ``out_dir`` (an existing folder, local or a URL).

  Returns:
    The summary written to <out_dir>/<stem>.json: inputs, size, windows, class map path,
    'classes' {name: {'pixels', 'fraction' (of valid pixels), 'area' (CRS units^2, when
    georeferenced)}}, 'nodata_pixels', 'georef' ({'crs', 'units', 'transform', 'pixel_area'} or
    None), 'seconds', 'windows_per_second'.
  """
  settings, tile = config.field, config.data.image_size
  height, width = source.height, source.width
  count = (len(window_origins(height, tile, settings.overlap)) *
           len(window_origins(width, tile, settings.overlap)))
  progress = Progress(f'field {stem} (tta {settings.tta})', count)
  summary = _Summary(height, width, settings.preview_size)
  blocks = infer_field(source, forward, tile=tile, overlap=settings.overlap,
                       batch_size=settings.batch_size, modality=config.data.modality,
                       progress=progress.update)
  out_dir = epath.Path(out_dir)
  class_map = out_dir / f'{stem}_classes.{"tif" if source.is_tiff else "png"}'
  start = time.perf_counter()
  _write_class_map(class_map, summary.watch(blocks), source)
  seconds = time.perf_counter() - start
  rate = progress.finish()
  preview, figure = _write_previews(stem, out_dir, summary, class_names)
  valid_pixels = int(summary.counts[:len(class_names)].sum())
  georef = source.georef
  result = {
      'inputs': list(source.paths), 'height': height, 'width': width, 'tile': tile,
      'overlap': settings.overlap, 'tta': settings.tta, 'windows': count,
      'class_map': str(class_map), 'preview': preview, 'overlay': figure,
      'backend': source.backend,
      'classes': {name: {'pixels': int(summary.counts[c]),
                         'fraction': float(summary.counts[c] / max(valid_pixels, 1))}
                  for c, name in enumerate(class_names)},
      'nodata_pixels': int(summary.counts[NODATA_CLASS]), 'georef': None,
      'seconds': seconds, 'windows_per_second': rate}
  if georef is not None:
    result['georef'] = {'crs': georef.crs, 'units': georef.units,
                        'transform': list(georef.transform), 'pixel_area': georef.pixel_area}
    for entry in result['classes'].values():
      entry['area'] = entry['pixels'] * georef.pixel_area
  (out_dir / f'{stem}.json').write_text(json.dumps(result, indent=2))
  return result


def _stem(paths: Sequence[str]) -> str:
  return os.path.splitext(os.path.basename(paths[0]))[0]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``--mode=field``: class maps of every field in config.field.inputs with the workdir's model.

  Per field <stem> (the first file's name without suffix) in config.field.output_dir ('' =
  <workdir>/field; local or a URL such as gs://..., see the module docstring): <stem>_classes.tif
  (TIFF input; GeoTIFF tags kept) or .png, <stem>_preview.png, <stem>_overlay.png and <stem>.json
  (``predict_field``).

  Returns:
    {'output_dir', 'fields': [the per-field summaries]}.

  Raises:
    ValueError: a bad config field, named; more than one process.
    FileNotFoundError / BadFileError: a missing or bad field image, named (before any compute).
  """
  settings = config.field
  if not settings.inputs.strip():
    raise ValueError("config.field.inputs is empty: name the field images, e.g. "
                     "--config.field.inputs=field.tif,rgb.tif+nir.tif")
  fields = parse_inputs(settings.inputs)
  stems = [_stem(paths) for paths in fields]
  if len(set(stems)) != len(stems):
    raise ValueError(f'config.field.inputs: two fields share a file name {stems}: their outputs '
                     'would overwrite each other')
  mesh, model = experiment.setup_inference(config, settings.batch_size, 'config.field.batch_size')
  if jax.process_count() > 1:
    raise ValueError(f'--mode=field runs on one process; got {jax.process_count()}')
  backend = 'rasterio' if field_io.rasterio_available() else 'tifffile'
  if backend == 'tifffile':
    logging.info('field: rasterio is not installed (pip install agrivision_jax[geo]); reading '
                 'with tifffile, GeoTIFF tags copied verbatim')
  sources = [FieldSource(paths, settings.band_order, settings.nodata, backend)
             for paths in fields]
  variables = experiment.restore_variables(config, workdir, mesh)
  forward = make_forward(model, variables, mesh, settings.tta,
                         window_weight(config.data.image_size, settings.overlap))
  out_dir = (workdir_lib.path(settings.output_dir) if settings.output_dir
             else workdir_lib.path(workdir) / 'field')
  out_dir.mkdir(parents=True, exist_ok=True)
  class_names = data_lib.class_names(config.data.version)
  results = []
  with field_io.raster_environment(backend):
    for stem, source in zip(stems, sources):
      try:
        results.append(predict_field(source, forward, config, out_dir, stem, class_names))
      finally:
        source.close()
      logging.info('field %s: %s', stem, results[-1]['class_map'])
  return {'output_dir': str(out_dir), 'fields': results}
