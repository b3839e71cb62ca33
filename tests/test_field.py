"""Whole-field inference: tiling equals tile-by-tile predict, blending equals a brute-force sum,
no seams, nodata, georeferencing kept, band plumbing, and one-line errors naming the file."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tifffile
from PIL import Image

from agrivision_jax import checkpointing
from agrivision_jax import configuration
from agrivision_jax import experiment
from agrivision_jax import field
from agrivision_jax import field_io
from agrivision_jax import models
from agrivision_jax import predict
from agrivision_jax.configs import common
from agrivision_jax.data import BadFileError

TILE = 64
# GeoTIFF tags of a 0.5 m UTM 15N grid whose top-left corner is (500000, 4500000).
PIXEL_SCALE = (0.5, 0.5, 0.0)
TIEPOINT = (0.0, 0.0, 0.0, 500000.0, 4500000.0, 0.0)
GEOKEYS = (1, 1, 0, 4, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, 32615, 3076, 0, 1, 9001)


def tiny_config(tmp_path, **field_settings):
  """IBN-Net20-s at width 8 on 64 px tiles; config.field updated with ``field_settings``."""
  config = common.get_config('depth=20', ibn_mode='s')
  config.model.update(dict(width=8, aspp_channels=8, decoder_channels=8, low_level_channels=4))
  config.data.update(dict(source='synthetic', data_dir=str(tmp_path / 'unused'),
                          image_size=TILE, batch_size=8, eval_batch_size=8, num_workers=0))
  config.data.synthetic.size = TILE
  config.field.update(dict(output_dir=str(tmp_path / 'out'), batch_size=8, preview_size=100,
                           overlap=16))
  config.field.update(field_settings)
  return config


@pytest.fixture(scope='module')
def model_and_variables(tmp_path_factory):
  """The tiny model and random {'params', 'batch_stats'} (shapes from jax.eval_shape)."""
  model = models.model_from_spec(
      configuration.model_spec(tiny_config(tmp_path_factory.mktemp('m'))))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, TILE, TILE, 4)),
                                             train=False))
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name == 'var':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return ((name == 'scale') + rng.normal(0, 0.1, leaf.shape)).astype(np.float32)

  return model, jax.tree_util.tree_map_with_path(fill, shapes)


def use_variables(monkeypatch, variables, backend):
  """Makes field.run use ``variables`` (instead of a workdir checkpoint) and ``backend``."""
  monkeypatch.setattr(experiment, 'restore_variables',
                      lambda config, workdir, mesh: checkpointing.place_replicated(variables, mesh))
  if backend == 'rasterio':
    pytest.importorskip('rasterio')
  else:
    monkeypatch.setattr(field_io, 'rasterio_available', lambda: False)


def write_geotiff(path, image, nodata=None, **kwargs):
  """Writes (H, W, B) uint8 as a strip TIFF with GeoTIFF tags (and a GDAL_NODATA tag)."""
  tags = [(33550, 'd', 3, PIXEL_SCALE, True), (33922, 'd', 6, TIEPOINT, True),
          (34735, 'H', len(GEOKEYS), GEOKEYS, True)]
  if nodata is not None:
    tags.append((42113, 's', 0, str(nodata), True))
  kwargs.setdefault('rowsperstrip', 16)
  tifffile.imwrite(path, image, photometric='minisblack', planarconfig='contig', extratags=tags,
                   metadata=None, **kwargs)


def random_field(height, width, seed, bands=4):
  """(H, W, bands) uint8 noise over smooth blobs, no all-zero pixel."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:height, :width]
  blobs = 120 + 80 * np.sin(y[..., None] / 17.0 + np.arange(bands)) * np.cos(x[..., None] / 23.0)
  return np.clip(blobs + rng.normal(0, 20, (height, width, bands)), 1, 255).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize('backend', ['tifffile', 'rasterio'])
def test_zero_overlap_equals_tile_by_tile_predict_and_keeps_georeferencing(
    tmp_path, monkeypatch, model_and_variables, backend):
  model, variables = model_and_variables
  use_variables(monkeypatch, variables, backend)
  height, width = 200, 300
  image = random_field(height, width, seed=1)
  write_geotiff(tmp_path / 'farm.tif', image)
  config = tiny_config(tmp_path, inputs=str(tmp_path / 'farm.tif'), overlap=0, tta='none')
  result = field.run(config, str(tmp_path / 'workdir'))['fields'][0]
  classes = tifffile.imread(result['class_map'])

  # Reference: every aligned 64 px tile, zero-padded past the edge, through predict.
  padded = np.zeros((256, 320, 4), np.uint8)
  padded[:height, :width] = image
  tiles = [padded[y:y + TILE, x:x + TILE] for y in range(0, 256, TILE) for x in range(0, 320, TILE)]
  tiles += [np.zeros_like(tiles[0])] * 4
  batches = [{'image': field.data_lib.normalize(np.stack(tiles[i:i + 8]), 'nrgb'),
              'labels': np.zeros((8, TILE, TILE, 7), np.float32),
              'valid': np.ones((8, TILE, TILE), bool), 'id': np.array(['x'] * 8)}
             for i in range(0, len(tiles), 8)]
  mesh = experiment.create_mesh()
  predicted = np.concatenate([p for _, p, _ in predict.predict_batches(
      model, checkpointing.place_replicated(variables, mesh), batches, mesh, 'none')])
  expected = predicted[:20].reshape(4, 5, TILE, TILE).transpose(0, 2, 1, 3).reshape(256, 320)
  np.testing.assert_array_equal(classes, expected[:height, :width])
  assert len(np.unique(classes)) > 1

  out = field_io.open_raster(result['class_map'], 'tifffile')
  assert out.georef.transform == (0.5, 0.0, 500000.0, 0.0, -0.5, 4500000.0)
  assert (out.georef.crs, out.georef.units) == ('EPSG:32615', 'metre')
  assert out.nodata == (255.0,)
  if backend == 'tifffile':
    written = tifffile.TiffFile(result['class_map']).pages[0].tags
    assert written[33550].value == PIXEL_SCALE and written[33922].value == TIEPOINT
    assert written[34735].value == GEOKEYS
  summary = json.load(open(tmp_path / 'out' / 'farm.json'))
  counts = np.bincount(classes.ravel(), minlength=7)
  for c, entry in enumerate(summary['classes'].values()):
    assert entry['pixels'] == counts[c]
    assert entry['fraction'] == pytest.approx(counts[c] / classes.size)
    assert entry['area'] == pytest.approx(counts[c] * 0.25)
  assert summary['georef']['crs'] == 'EPSG:32615' and summary['nodata_pixels'] == 0
  preview = np.asarray(Image.open(result['preview']))
  assert preview.shape == (67, 100, 3)   # every 3rd row and column of 200 x 300


@pytest.mark.slow
def test_overlap_blending_equals_a_brute_force_weighted_sum(tmp_path, monkeypatch,
                                                            model_and_variables):
  model, variables = model_and_variables
  use_variables(monkeypatch, variables, 'tifffile')
  height, width, overlap = 150, 170, 24
  image = random_field(height, width, seed=2)
  image[40:90, 100:150] = 0    # nodata (all bands 0 without a tag)
  write_geotiff(tmp_path / 'f.tif', image, tile=(32, 32))
  reads = []
  original = field_io._TiffRaster.read_rows
  monkeypatch.setattr(field_io._TiffRaster, 'read_rows',
                      lambda self, y0, y1: reads.append(y1 - y0) or original(self, y0, y1))
  config = tiny_config(tmp_path, inputs=str(tmp_path / 'f.tif'), overlap=overlap, tta='none')
  classes = tifffile.imread(field.run(config, str(tmp_path))['fields'][0]['class_map'])
  assert max(reads) == TILE   # strips of one window row

  # Brute force: every window's weighted logits summed over the whole padded field at once.
  mesh = experiment.create_mesh()
  forward = field.make_forward(model, checkpointing.place_replicated(variables, mesh), mesh,
                               'none', np.ones((TILE, TILE), np.float32))
  stride = TILE - overlap
  tops, lefts = np.arange(0, height - overlap, stride), np.arange(0, width - overlap, stride)
  padded = np.zeros((tops[-1] + TILE, lefts[-1] + TILE, 4), np.uint8)
  padded[:height, :width] = image
  ramp = np.sin(np.pi / 2 * np.minimum((np.minimum(np.arange(TILE), np.arange(TILE)[::-1]) + 0.5)
                                       / overlap, 1)) ** 2
  total = np.zeros(padded.shape[:2] + (7,), np.float32)
  for top in tops:
    for left in lefts:
      window = np.zeros((8, TILE, TILE, 4), np.uint8)
      window[0] = padded[top:top + TILE, left:left + TILE]
      logits = np.asarray(forward(field.data_lib.normalize(window, 'nrgb')))[0]
      total[top:top + TILE, left:left + TILE] += logits * np.outer(ramp, ramp)[..., None]
  expected = np.argmax(total[:height, :width], -1)
  expected[(image == 0).all(-1)] = 255
  np.testing.assert_array_equal(classes, expected)
  assert (classes == 255).sum() == 50 * 50 and len(np.unique(classes)) > 2


@pytest.mark.slow
def test_constant_logit_model_gives_a_constant_map_without_seams(tmp_path, monkeypatch,
                                                                 model_and_variables):
  _, variables = model_and_variables
  params = jax.tree_util.tree_map(np.array, variables['params'])
  head = params['decoder']['last_conv_8']
  head['kernel'][:] = 0
  head['bias'][:] = [0.5, 1.0, -2.0, 3.0, 2.5, 0.0, -1.0]   # class 3 everywhere
  use_variables(monkeypatch, {'params': params, 'batch_stats': variables['batch_stats']},
                'tifffile')
  image = random_field(130, 190, seed=3)
  image[:, 110:] = 0     # nodata (all bands zero); the windows at x = 120 and 144 are skipped
  Image.fromarray(image[..., :3]).save(tmp_path / 'rgb.png')
  Image.fromarray(image[..., 3]).save(tmp_path / 'nir.png')
  config = tiny_config(tmp_path, inputs=f'{tmp_path}/rgb.png + {tmp_path}/nir.png', overlap=40,
                       tta='flips')
  result = field.run(config, str(tmp_path))['fields'][0]
  classes = np.asarray(Image.open(result['class_map']))
  assert result['class_map'].endswith('rgb_classes.png') and classes.shape == (130, 190)
  np.testing.assert_array_equal(classes[:, :110], 3)
  np.testing.assert_array_equal(classes[:, 110:], 255)
  assert result['classes']['planter_skip']['pixels'] == 130 * 110
  assert result['nodata_pixels'] == 130 * 80 and result['georef'] is None


def test_window_grid_and_weights():
  np.testing.assert_array_equal(field.window_origins(300, 64, 0), [0, 64, 128, 192, 256])
  np.testing.assert_array_equal(field.window_origins(64, 64, 16), [0])
  np.testing.assert_array_equal(field.window_origins(65, 64, 16), [0, 48])
  np.testing.assert_array_equal(field.window_origins(10, 64, 16), [0])
  weight = field.window_weight(64, 16)
  assert weight.min() > 0 and weight[16:48, 16:48].min() == 1.0
  ramp = weight[32]
  # Two windows 48 px apart: their weights over the 16 shared pixels sum to 1 (sin^2 + cos^2).
  np.testing.assert_allclose(ramp[48:] + ramp[:16], 1.0, atol=1e-6)
  np.testing.assert_array_equal(field.window_weight(64, 0), 1.0)


def test_pair_band_order_alpha_and_nodata_tag(tmp_path):
  image = random_field(37, 53, seed=4)
  Image.fromarray(image[..., :3]).save(tmp_path / 'rgb.png')
  Image.fromarray(image[..., 3]).save(tmp_path / 'nir.png')
  pair = field.FieldSource([str(tmp_path / 'rgb.png'), str(tmp_path / 'nir.png')], 'RGBN', -1,
                           'tifffile')
  alpha = np.full((37, 53), 255, np.uint8)
  alpha[:5] = 0
  shuffled = np.stack([image[..., 2], alpha, image[..., 3], image[..., 1], image[..., 0]], -1)
  shuffled[30:, :7, [0, 2, 3, 4]] = 9                      # tagged nodata value
  write_geotiff(tmp_path / 'bands.tif', shuffled, nodata=9)
  tiff = field.FieldSource([str(tmp_path / 'bands.tif')], 'BANGR', -1, 'tifffile')
  got, valid = tiff.read_rows(0, 37)
  expected_valid = np.ones((37, 53), bool)
  expected_valid[:5] = expected_valid[30:, :7] = False
  np.testing.assert_array_equal(valid, expected_valid)
  np.testing.assert_array_equal(got, np.where(expected_valid[..., None], image, 0))
  np.testing.assert_array_equal(pair.read_rows(3, 20)[0], image[3:20])
  assert pair.read_rows(3, 20)[1].all()
  explicit = field.FieldSource([str(tmp_path / 'bands.tif')], 'BANGR', 0, 'tifffile')
  assert explicit.read_rows(0, 37)[1][30:, :7].all()    # nodata=0 overrides the tag


def _one_line_error(error_type, path, make):
  with pytest.raises(error_type) as info:
    make()
  message = str(info.value)
  assert path in message and '\n' not in message, message


def test_bad_inputs_are_one_line_errors_naming_the_file(tmp_path, monkeypatch):
  Image.fromarray(np.ones((30, 40, 3), np.uint8)).save(tmp_path / 'rgb.png')
  Image.fromarray(np.ones((31, 40), np.uint8)).save(tmp_path / 'nir.png')
  rgb, nir = str(tmp_path / 'rgb.png'), str(tmp_path / 'nir.png')
  _one_line_error(BadFileError, nir, lambda: field.FieldSource([rgb, nir], 'RGBN', -1, 'tifffile'))
  write_geotiff(tmp_path / 'three.tif', np.ones((20, 20, 3), np.uint8))
  three = str(tmp_path / 'three.tif')
  _one_line_error(BadFileError, three, lambda: field.FieldSource([three], 'RGBN', -1, 'tifffile'))
  (tmp_path / 'junk.tif').write_bytes(b'II*\x00garbage' * 10)
  junk = str(tmp_path / 'junk.tif')
  for backend in ('tifffile', 'rasterio') if field_io.rasterio_available() else ('tifffile',):
    _one_line_error(BadFileError, junk, lambda: field.FieldSource([junk], 'RGBN', -1, backend))
  tifffile.imwrite(tmp_path / 'deep.tif', np.ones((8, 8, 4), np.uint16))
  deep = str(tmp_path / 'deep.tif')
  _one_line_error(BadFileError, deep, lambda: field.FieldSource([deep], 'RGBN', -1, 'tifffile'))
  missing = str(tmp_path / 'missing.tif')
  _one_line_error(FileNotFoundError, missing,
                  lambda: field.FieldSource([missing], 'RGBN', -1, 'tifffile'))
  monkeypatch.setattr(field_io, 'rasterio_available', lambda: False)
  _one_line_error(FileNotFoundError, missing,
                  lambda: field.run(tiny_config(tmp_path, inputs=missing), str(tmp_path)))
  for name, value in (('overlap', TILE), ('band_order', 'RGB'), ('tta', 'd8'), ('nodata', -2)):
    with pytest.raises(ValueError, match=f'config.field.{name}'):
      field.run(tiny_config(tmp_path, inputs=missing, **{name: value}), str(tmp_path))


@pytest.mark.parametrize('layout', [dict(rowsperstrip=7), dict(rowsperstrip=10, compression='zlib'),
                                    dict(tile=(32, 48)), dict(planarconfig='separate', tile=(32, 32),
                                                              compression='zlib')])
def test_tiff_row_reads_equal_the_whole_image(tmp_path, layout):
  image = np.random.default_rng(5).integers(0, 256, (203, 301, 4), dtype=np.uint8)
  stored = np.moveaxis(image, -1, 0) if 'planarconfig' in layout else image
  layout = {'planarconfig': 'contig', **layout}
  tifffile.imwrite(tmp_path / 'f.tif', stored, photometric='minisblack', metadata=None, **layout)
  whole = tifffile.imread(tmp_path / 'f.tif')
  whole = np.moveaxis(whole, 0, -1) if layout['planarconfig'] == 'separate' else whole
  np.testing.assert_array_equal(whole, image)
  raster = field_io.open_raster(str(tmp_path / 'f.tif'), 'tifffile')
  for y0, y1 in ((0, 203), (5, 70), (190, 203), (31, 33)):
    np.testing.assert_array_equal(raster.read_rows(y0, y1), whole[y0:y1])
  raster.close()
