"""--mode=predict, divergence and field write their outputs through etils.epath, so a gs:// workdir
works: gs:// is served here by an in-memory fsspec filesystem (no network), and nothing may land
on the local disk instead (no 'gs:' folder, no leftover temporary class map)."""

import io
import json
import os
import tempfile

import fsspec
import numpy as np
import pytest
import tifffile
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from agrivision_jax import data as data_lib
from agrivision_jax import divergence
from agrivision_jax import experiment
from agrivision_jax import field
from agrivision_jax import field_io
from agrivision_jax import models
from agrivision_jax import overlay
from agrivision_jax import predict
from agrivision_jax.configs import common

CLASS_NAMES = data_lib.class_names('2020')   # the configs' default release: 7 classes


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs:// paths served from a fresh in-memory filesystem; cwd and the temp dir in tmp_path.

  Returns the filesystem's store {'gs://...': file}, so tests can list what was written.
  """
  memory = MemoryFileSystem(skip_instance_cache=True)
  memory.store, memory.pseudo_dirs = {}, ['']
  local = fsspec.filesystem('file')
  monkeypatch.setattr(gpath, '_is_tf_installed', lambda: False)   # gs:// -> the fsspec backend
  monkeypatch.setattr(epath_backend.fsspec_backend, 'fs',
                      lambda path: memory if os.fspath(path).startswith('gs://') else local)
  (tmp_path / 'cwd').mkdir()
  (tmp_path / 'tmp').mkdir()
  monkeypatch.chdir(tmp_path / 'cwd')
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  yield memory.store
  assert not os.listdir(tmp_path / 'cwd'), 'an output went to a local path named after the URL'
  assert not os.listdir(tmp_path / 'tmp'), 'a temporary file was left behind'


def read_png(path: str) -> np.ndarray:
  with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as image:
    assert image.format == 'PNG'
    return np.asarray(image)


def test_index_png_and_overlay_go_through_epath(bucket):
  index_map = np.arange(12, dtype=np.int32).reshape(3, 4) % 7
  overlay.write_index_png(epath.Path('gs://b/run/x.png'), index_map)
  np.testing.assert_array_equal(read_png('gs://b/run/x.png'), index_map)
  rng = np.random.default_rng(0)
  overlay.save_overlay('gs://b/run/figures/x.png',   # a plain str URL, folder not yet there
                       rng.integers(0, 255, (8, 8, 4), np.uint8), index_map[:2, :2].repeat(4, 0)
                       .repeat(4, 1), np.ones((8, 8), bool), CLASS_NAMES, title='x')
  assert read_png('gs://b/run/figures/x.png').shape[-1] == 4   # RGBA figure
  assert sorted(bucket) == ['gs://b/run/figures/x.png', 'gs://b/run/x.png']


def _fake_predict_setup(monkeypatch, examples):
  """predict.run without a model: the prediction of tile k is its labels' argmax."""
  monkeypatch.setattr(experiment, 'setup_inference', lambda config, batch, field: (None, None))
  monkeypatch.setattr(experiment, 'restore_variables', lambda config, workdir, mesh: None)
  monkeypatch.setattr(data_lib, 'create_source', lambda config, split: examples)
  monkeypatch.setattr(data_lib, 'create_eval_iterator', lambda *args: None)

  def batches(model, variables, batches, mesh, tta):
    for start in range(0, len(examples), 2):
      chunk = examples[start:start + 2]
      prediction = np.stack([example['labels'].argmax(-1) for example in chunk])
      confusion = np.eye(len(CLASS_NAMES), dtype=np.int64) * 10
      yield {'id': np.asarray([example['id'] for example in chunk])}, prediction, confusion

  monkeypatch.setattr(predict, 'predict_batches', batches)


def test_predict_run_writes_pngs_overlays_and_json_to_a_gs_workdir(bucket, monkeypatch):
  rng = np.random.default_rng(1)
  examples = [{'id': f'tile{k}', 'image': rng.integers(0, 255, (8, 8, 4), np.uint8),
               'labels': rng.integers(0, 2, (8, 8, len(CLASS_NAMES))).astype(np.float32),
               'valid': np.ones((8, 8), bool)} for k in range(3)]
  _fake_predict_setup(monkeypatch, examples)
  config = common.get_config('depth=50')
  config.predict.update(dict(split='val', tta='flips', num_overlays=2))
  result = predict.run(config, 'gs://b/run')
  assert result['output_dir'] == 'gs://b/run/predictions/val' and result['num_tiles'] == 3
  for example in examples:
    np.testing.assert_array_equal(read_png(f"gs://b/run/predictions/val/{example['id']}.png"),
                                  example['labels'].argmax(-1))
  overlays = sorted(path for path in bucket if '_overlays/' in path)
  assert overlays == ['gs://b/run/predictions/val_overlays/tile0.png',
                      'gs://b/run/predictions/val_overlays/tile1.png']
  saved = json.loads(epath.Path('gs://b/run/predictions/val_tta_flips.json').read_text())
  assert saved['num_tiles'] == 3 and 'miou' in saved


def test_divergence_run_writes_json_stats_and_plot_to_a_gs_workdir(bucket, monkeypatch,
                                                                   scripts):
  names = models.backbone_layer_names('resnet50')
  rng = np.random.default_rng(2)
  stats_a = {name: divergence.ChannelStats.from_samples(rng.normal(0, 1, (5, 3)))
             for name in names}
  stats_b = {name: divergence.ChannelStats.from_samples(rng.normal(1, 2, (5, 3)))
             for name in names}
  monkeypatch.setattr(experiment, 'setup_inference', lambda config, batch, field: (None, None))
  monkeypatch.setattr(experiment, 'restore_variables', lambda config, workdir, mesh: None)
  monkeypatch.setattr(data_lib, 'create_source', lambda config, split: [None] * 5)
  monkeypatch.setattr(data_lib, 'create_eval_iterator', lambda *args: None)
  monkeypatch.setattr(divergence, 'accumulate_statistics',
                      lambda *args, **kwargs: (stats_a, stats_b, 5))
  result = divergence.run(common.get_config('depth=50'), 'gs://b/run')
  assert json.loads(epath.Path('gs://b/run/divergence.json').read_text()) == json.loads(
      json.dumps(result))
  with np.load(io.BytesIO(epath.Path('gs://b/run/divergence_stats.npz').read_bytes())) as stats:
    np.testing.assert_allclose(stats['layer4_2/var_b'], stats_b['layer4_2'].variance())
    assert int(stats['count']) == 5
  read_png('gs://b/run/divergence.png')

  # The plotting script reads runs from URLs and writes --out to one.
  script = scripts('plot_divergence')
  script.main(['gs://b/run', 'gs://b/run/divergence.json', '--labels=a,b',
               '--out=gs://b/plots/both.png'])
  read_png('gs://b/plots/both.png')
  with pytest.raises(FileNotFoundError, match='divergence.json'):
    script.main(['gs://b/plots', '--out=gs://b/plots/none.png'])


@pytest.mark.parametrize('suffix', ['tif', 'png'])
def test_field_run_writes_class_map_previews_and_json_to_a_gs_workdir(bucket, tmp_path,
                                                                      monkeypatch, suffix):
  rng = np.random.default_rng(3)
  image = rng.integers(1, 255, (70, 90, 4), np.uint8)
  if suffix == 'tif':
    tifffile.imwrite(tmp_path / 'farm.tif', image, photometric='minisblack',
                     planarconfig='contig', metadata=None)
    inputs = str(tmp_path / 'farm.tif')
  else:
    Image.fromarray(image[..., :3]).save(tmp_path / 'farm.png')
    Image.fromarray(image[..., 3]).save(tmp_path / 'nir.png')
    inputs = f'{tmp_path}/farm.png + {tmp_path}/nir.png'
  bias = np.asarray([0.5, 1.0, -2.0, 3.0, 2.5, 0.0, -1.0], np.float32)   # class 3 everywhere

  def make_forward(model, variables, mesh, tta, weight):
    return lambda images: np.broadcast_to(bias * weight[..., None], images.shape[:3] + bias.shape)

  monkeypatch.setattr(experiment, 'setup_inference', lambda config, batch, field: (None, None))
  monkeypatch.setattr(experiment, 'restore_variables', lambda config, workdir, mesh: None)
  monkeypatch.setattr(field, 'make_forward', make_forward)
  monkeypatch.setattr(field_io, 'rasterio_available', lambda: False)
  config = common.get_config('depth=50')
  config.data.image_size = 32
  config.field.update(dict(inputs=inputs, overlap=8, preview_size=50))
  result = field.run(config, 'gs://b/run')
  assert result['output_dir'] == 'gs://b/run/field'
  summary = result['fields'][0]
  class_map = f'gs://b/run/field/farm_classes.{suffix}'
  assert summary['class_map'] == class_map
  data = epath.Path(class_map).read_bytes()
  classes = tifffile.imread(io.BytesIO(data)) if suffix == 'tif' else read_png(class_map)
  assert classes.shape == (70, 90)
  np.testing.assert_array_equal(classes, 3)
  assert read_png(summary['preview']).shape == (35, 45, 3)
  read_png(summary['overlay'])
  saved = json.loads(epath.Path('gs://b/run/field/farm.json').read_text())
  assert saved['class_map'] == class_map and saved['classes'][CLASS_NAMES[3]]['pixels'] == 70 * 90
  assert sorted(bucket) == sorted([class_map, 'gs://b/run/field/farm.json',
                                   'gs://b/run/field/farm_overlay.png',
                                   'gs://b/run/field/farm_preview.png'])


def test_field_output_dir_may_be_its_own_url(bucket, tmp_path, monkeypatch):
  """config.field.output_dir overrides <workdir>/field, local or not."""
  image = np.full((20, 20, 4), 9, np.uint8)
  tifffile.imwrite(tmp_path / 'small.tif', image, photometric='minisblack',
                   planarconfig='contig', metadata=None)
  monkeypatch.setattr(experiment, 'setup_inference', lambda config, batch, field: (None, None))
  monkeypatch.setattr(experiment, 'restore_variables', lambda config, workdir, mesh: None)
  monkeypatch.setattr(field, 'make_forward', lambda *args: lambda images: np.zeros(
      images.shape[:3] + (len(CLASS_NAMES),), np.float32))
  monkeypatch.setattr(field_io, 'rasterio_available', lambda: False)
  config = common.get_config('depth=50')
  config.data.image_size = 16
  config.field.update(dict(inputs=str(tmp_path / 'small.tif'), overlap=4, preview_size=20,
                           output_dir='gs://other/maps'))
  result = field.run(config, str(tmp_path / 'workdir'))
  assert result['output_dir'] == 'gs://other/maps'
  assert 'gs://other/maps/small_classes.tif' in bucket
  assert not (tmp_path / 'workdir' / 'field').exists()
