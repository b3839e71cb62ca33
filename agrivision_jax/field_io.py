"""Field rasters: row-range reads of GeoTIFF / TIFF / PNG / JPEG images, streamed class-map writes.

Two backends with the same interface: rasterio (GDAL; the optional extra ``geo``), used when it is
installed, and tifffile + Pillow otherwise. A TIFF is read a range of rows at a time (only the
strips or tiles that hold them are decoded) and the class map is written as a tiled, deflate-
compressed TIFF from a stream of row blocks, so neither side holds a whole field. PNG and JPEG
are decoded whole (their formats have no random access) and their class map is a PNG.

GeoTIFF without rasterio: the GeoTIFF tags (ModelPixelScale 33550, ModelTiepoint 33922,
ModelTransformation 34264, GeoKeyDirectory 34735, GeoDoubleParams 34736, GeoAsciiParams 34737)
are copied verbatim onto the class map, which has the same pixel grid.
"""

import contextlib
import dataclasses
import math
import os
import warnings
from collections.abc import Iterable, Iterator

import numpy as np
import tifffile
from PIL import Image

from agrivision_jax.data import BadFileError

GEOTIFF_TAGS = (33550, 33922, 34264, 34735, 34736, 34737)
GDAL_NODATA_TAG = 42113
TIFF_SUFFIXES = ('.tif', '.tiff')
OUTPUT_TILE = 256
# GDAL's block cache (default 5% of RAM): enough for the tile rows a window row spans.
GDAL_CACHE_BYTES = 128 * 2**20
# GeoKeyDirectory keys: ProjectedCSType, GeographicType, ProjLinearUnits; EPSG unit codes.
_PROJECTED_CRS_KEY, _GEOGRAPHIC_CRS_KEY, _LINEAR_UNITS_KEY = 3072, 2048, 3076
_UNITS = {9001: 'metre', 9002: 'foot', 9003: 'US survey foot'}


def rasterio_available() -> bool:
  """True when the optional rasterio backend can be imported."""
  try:
    import rasterio  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def raster_environment(backend: str) -> contextlib.AbstractContextManager:
  """The context to read and write in: for rasterio, a GDAL block cache of GDAL_CACHE_BYTES."""
  if backend != 'rasterio':
    return contextlib.nullcontext()
  import rasterio  # pylint: disable=g-import-not-at-top (optional extra)
  return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES)


@dataclasses.dataclass(frozen=True)
class Georef:
  """Where a raster lies: x = a*col + b*row + c, y = d*col + e*row + f (GDAL / affine order).

  Attributes:
    transform: (a, b, c, d, e, f) of the pixel grid's top-left corners.
    crs: e.g. 'EPSG:32615', or None when the file names none that can be read.
    units: the CRS's linear unit ('metre', 'foot', 'degree'...) or None when unknown.
    tags: tifffile extratags (code, dtype, count, value, writeonce) of the GeoTIFF tags, copied
      verbatim by the tifffile writer; () for the rasterio backend, whose writer uses crs_object.
    crs_object: rasterio's CRS (rasterio backend only).
  """
  transform: tuple[float, ...]
  crs: str | None
  units: str | None
  tags: tuple = ()
  crs_object: object = None

  @property
  def pixel_area(self) -> float:
    """The area of one pixel in CRS units squared, |a*e - b*d|."""
    a, b, _, d, e, _ = self.transform
    return abs(a * e - b * d)


class Raster:
  """An open image: ``height``, ``width``, ``count`` bands of uint8, per-band ``nodata`` (None =
  untagged), ``georef`` (None when not georeferenced), ``is_tiff``; ``read_rows(y0, y1)``."""
  path: str
  height: int
  width: int
  count: int
  nodata: tuple[float | None, ...]
  georef: Georef | None
  is_tiff: bool

  def read_rows(self, y0: int, y1: int) -> np.ndarray:
    """Returns rows [y0, y1) (0 <= y0 < y1 <= height) as (y1 - y0, width, count) uint8."""
    raise NotImplementedError

  def close(self) -> None:
    """Releases the file."""

  def _check_uint8(self, dtype) -> None:
    if np.dtype(dtype) != np.uint8:
      raise BadFileError(self.path, f'bands are {np.dtype(dtype)}; the model takes 8-bit bands '
                         '(uint8, as its training images): rescale the file to 0..255 first')


class _TiffRaster(Raster):
  """tifffile backend for TIFF: decodes only the strips or tiles that hold the rows asked for."""

  def __init__(self, path: str):
    self.path, self.is_tiff = path, True
    try:
      self._tif = tifffile.TiffFile(path)
      page = self._tif.pages[0]
      shape = page.shaped  # (separate samples, depth, length, width, contig samples)
    except (tifffile.TiffFileError, ValueError, IndexError, OSError) as e:
      raise BadFileError(path, f'not a readable TIFF ({e})') from e
    self._page = page
    self.height, self.width = page.imagelength, page.imagewidth
    self.count = shape[0] * shape[4]
    self._check_uint8(page.dtype)
    self.nodata = (page.nodata if GDAL_NODATA_TAG in page.tags else None,) * self.count
    self.georef = _tifffile_georef(page)

  def read_rows(self, y0: int, y1: int) -> np.ndarray:
    page = self._page
    segment_height, segment_width = ((page.tilelength, page.tilewidth) if page.is_tiled
                                     else (min(page.rowsperstrip, self.height), self.width))
    across = math.ceil(self.width / segment_width)
    per_plane = math.ceil(self.height / segment_height) * across
    planes = page.shaped[0]
    indices = [plane * per_plane + row * across + column for plane in range(planes)
               for row in range(y0 // segment_height, math.ceil(y1 / segment_height))
               for column in range(across)]
    out = np.zeros((planes, y1 - y0, self.width, page.shaped[4]), np.uint8)
    handle = self._tif.filehandle
    try:
      offsets = [page.dataoffsets[i] for i in indices]
      counts = [page.databytecounts[i] for i in indices]
      for data, index in handle.read_segments(offsets, counts, indices, lock=handle.lock):
        segment, (plane, _, top, left, _), _ = page.decode(data, index,
                                                           jpegtables=page.jpegtables)
        if segment is None:
          continue
        segment = segment.reshape(segment.shape[-3:])
        rows = slice(max(y0, top), min(y1, top + segment.shape[0], self.height))
        columns = min(segment.shape[1], self.width - left)
        out[plane, rows.start - y0:rows.stop - y0, left:left + columns] = (
            segment[rows.start - top:rows.stop - top, :columns])
    except (ValueError, NotImplementedError, OSError, tifffile.TiffFileError) as e:
      raise BadFileError(self.path, f'cannot decode rows {y0}..{y1} ({e})') from e
    return np.moveaxis(out, 0, 2).reshape(y1 - y0, self.width, self.count)

  def close(self) -> None:
    self._tif.close()


def _geokeys(page) -> dict[int, int]:
  """GeoKeyDirectory entries held inline (TIFFTagLocation 0): key -> value."""
  values = page.tags[34735].value
  return {values[i]: values[i + 3] for i in range(4, 4 + 4 * values[3], 4) if values[i + 1] == 0}


def _tifffile_georef(page) -> Georef | None:
  """Reads the GeoTIFF tags of a tifffile page (None when it has no pixel-to-CRS transform)."""
  tags = page.tags
  if 34264 in tags:
    m = tags[34264].value
    transform = (m[0], m[1], m[3], m[4], m[5], m[7])
  elif 33550 in tags and 33922 in tags:
    (sx, sy, *_), (i, j, _, x, y, *_) = tags[33550].value, tags[33922].value
    transform = (sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy)
  else:
    return None
  crs, units = None, None
  if 34735 in tags:
    keys = _geokeys(page)
    for key, unit in ((_PROJECTED_CRS_KEY, None), (_GEOGRAPHIC_CRS_KEY, 'degree')):
      if 0 < keys.get(key, 0) < 32767:
        crs, units = f'EPSG:{keys[key]}', unit
        break
    units = units or _UNITS.get(keys.get(_LINEAR_UNITS_KEY))
  copied = tuple((code, tags[code].dtype, tags[code].count, tags[code].value, True)
                 for code in GEOTIFF_TAGS if code in tags)
  return Georef(tuple(float(v) for v in transform), crs, units, copied)


class _PillowRaster(Raster):
  """Pillow backend for PNG / JPEG: decoded whole on the first read."""

  def __init__(self, path: str):
    self.path, self.is_tiff, self.georef = path, False, None
    try:
      with Image.open(path) as image:
        image.load()
        if image.mode not in ('L', 'RGB', 'RGBA'):
          raise BadFileError(path, f'image mode {image.mode}; expected 8-bit L, RGB or RGBA')
        self._array = np.asarray(image)
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
      raise BadFileError(path, f'not a readable image ({e})') from e
    if self._array.ndim == 2:
      self._array = self._array[..., None]
    self.height, self.width, self.count = self._array.shape
    self.nodata = (None,) * self.count

  def read_rows(self, y0: int, y1: int) -> np.ndarray:
    return self._array[y0:y1]


class _RasterioRaster(Raster):
  """rasterio backend: GDAL windowed reads of any format it knows."""

  def __init__(self, path: str):
    import rasterio  # pylint: disable=g-import-not-at-top (optional extra)
    self.path = path
    try:
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
        self._src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
      raise BadFileError(path, f'not a readable raster ({e})') from e
    src = self._src
    self.height, self.width, self.count = src.height, src.width, src.count
    self._check_uint8(src.dtypes[0])
    self.is_tiff = src.driver == 'GTiff'
    self.nodata = tuple(src.nodatavals)
    self.georef = None
    if src.crs is not None or not src.transform.is_identity:
      units = src.crs.linear_units if src.crs is not None else None
      self.georef = Georef(tuple(src.transform)[:6], src.crs.to_string() if src.crs else None,
                           None if units in (None, 'unknown') else units, (), src.crs)

  def read_rows(self, y0: int, y1: int) -> np.ndarray:
    from rasterio.windows import Window  # pylint: disable=g-import-not-at-top
    try:
      bands = self._src.read(window=Window(0, y0, self.width, y1 - y0))
    except Exception as e:  # rasterio raises RasterioIOError / CPLE_* for corrupt blocks
      raise BadFileError(self.path, f'cannot decode rows {y0}..{y1} ({e})') from e
    return np.moveaxis(bands, 0, -1)

  def close(self) -> None:
    self._src.close()


def open_raster(path: str, backend: str) -> Raster:
  """Opens ``path`` with ``backend`` 'rasterio' or 'tifffile' (tifffile for TIFF, Pillow for
  other formats).

  Raises:
    FileNotFoundError: no such file (the path in the message).
    BadFileError (a ValueError): unreadable, or bands that are not uint8 (the path first).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such field image')
  if backend == 'rasterio':
    return _RasterioRaster(path)
  if path.lower().endswith(TIFF_SUFFIXES):
    return _TiffRaster(path)
  return _PillowRaster(path)


def _tiles(blocks: Iterable[np.ndarray], width: int) -> Iterator[np.ndarray]:
  """Re-cuts row blocks (h, width) into OUTPUT_TILE-square tiles in TIFF order (zero-padded)."""
  pending = np.zeros((0, width), np.uint8)
  for block in blocks:
    pending = np.concatenate([pending, block])
    while pending.shape[0] >= OUTPUT_TILE:
      yield from _tile_row(pending[:OUTPUT_TILE], width)
      pending = pending[OUTPUT_TILE:]
  if pending.shape[0]:
    yield from _tile_row(pending, width)


def _tile_row(rows: np.ndarray, width: int) -> Iterator[np.ndarray]:
  for left in range(0, width, OUTPUT_TILE):
    tile = np.zeros((OUTPUT_TILE, OUTPUT_TILE), np.uint8)
    part = rows[:, left:left + OUTPUT_TILE]
    tile[:part.shape[0], :part.shape[1]] = part
    yield tile


def write_class_map(path: str, blocks: Iterable[np.ndarray], height: int, width: int,
                    georef: Georef | None, backend: str, nodata: int = 255) -> None:
  """Writes the class map streamed as row blocks to ``path`` (.tif: tiled deflate TIFF carrying
  ``georef``; .png: a grayscale PNG, assembled in memory).

  Args:
    path: output file; its suffix picks the format.
    blocks: (h_i, width) uint8 row blocks, top to bottom, sum(h_i) == height.
    height, width: the map's size.
    georef: the input's georeferencing, or None.
    backend: 'rasterio' or 'tifffile' (the backend that read the input).
    nodata: the class-map value of pixels that were not predicted (tagged as the TIFF's nodata).
  """
  if path.endswith('.png'):
    Image.fromarray(np.concatenate(list(blocks)), mode='L').save(path)
  elif backend == 'rasterio':
    import rasterio  # pylint: disable=g-import-not-at-top
    from rasterio.windows import Window  # pylint: disable=g-import-not-at-top
    profile = dict(driver='GTiff', height=height, width=width, count=1, dtype='uint8',
                   nodata=nodata, tiled=True, blockxsize=OUTPUT_TILE, blockysize=OUTPUT_TILE,
                   compress='deflate')
    if georef is not None:
      profile.update(crs=georef.crs_object, transform=rasterio.Affine(*georef.transform))
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', rasterio.errors.NotGeoreferencedWarning)
      with rasterio.open(path, 'w', **profile) as dst:
        top = 0
        for block in blocks:
          dst.write(block[None], window=Window(0, top, width, block.shape[0]))
          top += block.shape[0]
  else:
    extratags = [*(georef.tags if georef is not None else ()),
                 (GDAL_NODATA_TAG, 's', 0, str(nodata), True)]
    with tifffile.TiffWriter(path) as tif:
      tif.write(_tiles(blocks, width), shape=(height, width), dtype=np.uint8,
                tile=(OUTPUT_TILE, OUTPUT_TILE), compression='zlib', photometric='minisblack',
                extratags=extratags, metadata=None)
