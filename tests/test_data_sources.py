"""Data sources: directory and TFDS give identical examples; every bad input is named or skipped."""

import io
import logging
import os
import pickle
import re
import shutil
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from agrivision_jax import data
from agrivision_jax.data import layout
from agrivision_jax.data import prepare
from agrivision_jax.data import synthetic

SIZE = 40
NAMES = layout.class_names('2020')


def data_config(data_dir, **overrides):
  """config.data with the contract's fields."""
  config = ml_collections.ConfigDict(dict(
      source='directory', data_dir=str(data_dir), version='2020', modality='nrgb',
      image_size=SIZE, batch_size=4, eval_batch_size=4, num_workers=0, on_bad_example='error',
      augment=dict(shift_scale_aspect=True, hflip=True, vflip=True, rot90=True),
      synthetic=dict(num_train=9, num_val=5, num_test=3, size=SIZE, seed=3)))
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def clean_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('clean') / 'av'
  synthetic.generate(str(root.parent / 'tmp'), 9, 5, 3, SIZE, seed=3)
  os.rename(root.parent / 'tmp', root)
  return root


@pytest.fixture
def work_dir(clean_dir, tmp_path):
  """A fresh copy of the clean dataset that a test may damage."""
  root = tmp_path / 'av'
  shutil.copytree(clean_dir, root)
  return root


def ids_of(root, split='train'):
  return sorted(p[:-4] for p in os.listdir(root / split / 'images' / 'rgb'))


def expected_example(root, split, tile_id):
  """Reads a tile with PIL directly, following the published layout (reference)."""
  s = root / split
  rgb = np.asarray(Image.open(s / 'images' / 'rgb' / f'{tile_id}.jpg').convert('RGB'))
  nir = np.asarray(Image.open(s / 'images' / 'nir' / f'{tile_id}.jpg'))
  boundary = np.asarray(Image.open(s / 'boundaries' / f'{tile_id}.png')) / 255
  mask = np.asarray(Image.open(s / 'masks' / f'{tile_id}.png')) / 255
  labels = np.zeros((SIZE, SIZE, len(NAMES)), np.uint8)
  if split != 'test':
    for c, name in enumerate(NAMES[1:], start=1):
      labels[..., c] = np.asarray(Image.open(s / 'labels' / name / f'{tile_id}.png')) // 255
    labels[..., 0] = labels[..., 1:].sum(-1) == 0
  return np.dstack([rgb, nir]), labels, (boundary * mask) == 1


@pytest.mark.parametrize('split', ['train', 'test'])
def test_directory_source_reads_the_published_layout(clean_dir, split):
  source = data.create_source(data_config(clean_dir), split)
  assert source.ids == ids_of(clean_dir, split)
  for i in (0, len(source) - 1):
    example = source[i]
    image, labels, valid = expected_example(clean_dir, split, example['id'])
    assert example['image'].dtype == np.uint8 and example['image'].shape == (SIZE, SIZE, 4)
    np.testing.assert_array_equal(example['image'], image)
    assert example['labels'].dtype == np.uint8
    np.testing.assert_array_equal(example['labels'], labels)
    assert example['valid'].dtype == bool
    np.testing.assert_array_equal(example['valid'], valid)
  if split == 'test':
    assert not any(source[i]['labels'].any() for i in range(len(source)))


def test_tfds_and_directory_sources_are_identical(clean_dir, tmp_path):
  tfds_dir = tmp_path / 'tfds'
  prepare.main([f'--manual_dir={clean_dir}', f'--data_dir={tfds_dir}', '--version=2020',
                f'--image_size={SIZE}', '--num_threads=2'])
  for split in ('train', 'val', 'test'):
    directory = data.create_source(data_config(clean_dir), split)
    tfds_source = data.create_source(data_config(tfds_dir, source='tfds'), split)
    assert isinstance(tfds_source, data.TfdsSource)
    assert len(tfds_source) == len(directory)
    by_id = {directory[i]['id']: directory[i] for i in range(len(directory))}
    seen = set()
    for i in range(len(tfds_source)):
      example = tfds_source[i]
      reference = by_id[example['id']]
      for key in ('image', 'labels', 'valid'):
        assert example[key].dtype == reference[key].dtype
        np.testing.assert_array_equal(example[key], reference[key])
      seen.add(example['id'])
    assert seen == set(by_id)
  assert 'tensorflow' not in sys.modules
  with pytest.raises(ValueError, match=r'data\.image_size=32'):
    data.create_source(data_config(tfds_dir, source='tfds', image_size=32), 'val')
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / 'nothing'))):
    data.create_source(data_config(tmp_path / 'nothing', source='tfds'), 'val')


def test_class_names_of_both_releases():
  assert data.class_names('2020') == (
      'background', 'cloud_shadow', 'double_plant', 'planter_skip', 'standing_water', 'waterway',
      'weed_cluster')
  assert data.class_names('2021') == (
      'background', 'double_plant', 'drydown', 'endrow', 'nutrient_deficiency', 'planter_skip',
      'water', 'waterway', 'weed_cluster')


# ---------------------------------------------------------------------------------------------
# Bad input. Each damage function returns the path the error must name.

def missing_nir(root, tile_id):
  path = root / 'train' / 'images' / 'nir' / f'{tile_id}.jpg'
  path.unlink()
  return path


def missing_rgb(root, tile_id):
  path = root / 'train' / 'images' / 'rgb' / f'{tile_id}.jpg'
  path.unlink()
  return path


def truncated_jpeg(root, tile_id):
  path = root / 'train' / 'images' / 'rgb' / f'{tile_id}.jpg'
  content = path.read_bytes()
  path.write_bytes(content[:len(content) * 2 // 3])
  return path


def wrong_size(root, tile_id):
  path = root / 'train' / 'images' / 'nir' / f'{tile_id}.jpg'
  Image.open(path).resize((SIZE, SIZE - 8)).save(path, quality=95)
  return path


def non_binary_label(root, tile_id):
  path = root / 'train' / 'labels' / 'waterway' / f'{tile_id}.png'
  label = np.asarray(Image.open(path)).copy()
  label[3:5, 7:9] = 128
  Image.fromarray(label).save(path)
  return path


DAMAGES = {'missing_nir': (missing_nir, FileNotFoundError),
           'missing_rgb': (missing_rgb, FileNotFoundError),
           'truncated_jpeg': (truncated_jpeg, ValueError),
           'wrong_size': (wrong_size, ValueError),
           'non_binary_label': (non_binary_label, ValueError)}


@pytest.mark.parametrize('damage', sorted(DAMAGES))
def test_bad_tile_raises_naming_the_file(work_dir, damage):
  damage_fn, error = DAMAGES[damage]
  tile_id = ids_of(work_dir)[4]
  path = damage_fn(work_dir, tile_id)
  with pytest.raises(error, match=re.escape(str(path))):
    source = data.create_source(data_config(work_dir), 'train')
    source[source.ids.index(tile_id)]  # content is checked when the tile is read


def test_bad_tile_error_reaches_the_eval_iterator(work_dir):
  tile_id = ids_of(work_dir, 'val')[2]
  path = work_dir / 'val' / 'images' / 'rgb' / f'{tile_id}.jpg'
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ValueError, match=re.escape(str(path))):
    list(data.create_eval_iterator(data_config(work_dir), 'val', 0, 1))


@pytest.mark.slow
def test_bad_tile_error_survives_grain_worker_processes(work_dir):
  """The error raised in a worker process reaches the trainer with the file's name."""
  tile_id = ids_of(work_dir)[5]
  path = truncated_jpeg(work_dir, tile_id)
  batches = data.create_train_iterator(data_config(work_dir, num_workers=2), 0, 0, 1)
  with pytest.raises(Exception, match=re.escape(str(path))):
    for _ in range(3):  # 9 tiles in batches of 4: the bad one is in the first 3 batches
      next(batches)


def _raised(function, *args):
  with pytest.raises(Exception) as info:
    function(*args)
  return info.value


def test_every_data_error_pickles_with_its_message(work_dir, tmp_path):
  tile_id = ids_of(work_dir)[1]
  bad_jpeg = truncated_jpeg(work_dir, tile_id)
  missing = missing_nir(work_dir, ids_of(work_dir)[2])
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('x')
  tiles, _ = layout.list_tiles(str(work_dir), 'train', '2020', 'skip')
  errors = [
      _raised(layout.read_tile, next(t for t in tiles if t.id == tile_id), NAMES, SIZE),
      layout.BadFileError('some/file.png', 'binary PNG holds values [7] other than 0/255'),
      _raised(layout.list_tiles, str(work_dir), 'train', '2020'),
      _raised(layout.class_names, '2022'),
      _raised(synthetic.ensure_synthetic, str(tmp_path / 'other'), 3, 2, 1, 16, 0),
  ]
  assert (type(errors[0]), errors[0].path) == (layout.BadFileError, str(bad_jpeg))
  assert str(missing) in str(errors[2])
  for error in errors:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error) and copy.args == error.args
    assert getattr(copy, 'path', None) == getattr(error, 'path', None)


@pytest.mark.slow
def test_skip_drops_exactly_the_bad_tiles_and_reports_them(work_dir, tmp_path, caplog):
  all_ids = ids_of(work_dir)
  bad = {all_ids[i]: fn(work_dir, all_ids[i])
         for i, (fn, _) in zip((1, 3, 4, 6, 7), DAMAGES.values())}
  with caplog.at_level(logging.WARNING):
    source = data.create_source(data_config(work_dir, on_bad_example='skip'), 'train')
  assert source.ids == [i for i in all_ids if i not in bad]
  assert {b.id: b.path for b in source.skipped} == {k: str(v) for k, v in bad.items()}
  log = caplog.text
  assert f'skipped {len(DAMAGES)} bad tiles' in log
  assert all(str(path) in log for path in bad.values())
  for i in range(len(source)):  # the remaining tiles all read
    assert source[i]['id'] == source.ids[i]
  # The TFDS build applies the same policy and keeps the same tiles.
  tfds_dir = tmp_path / 'tfds'
  prepare.prepare(str(work_dir), str(tfds_dir), '2020', SIZE, 'skip', num_threads=2)
  tfds_source = data.create_source(data_config(tfds_dir, source='tfds'), 'train')
  assert sorted(tfds_source[i]['id'] for i in range(len(tfds_source))) == source.ids


def test_prepare_with_error_policy_names_the_bad_file(work_dir, tmp_path):
  path = non_binary_label(work_dir, ids_of(work_dir)[0])
  with pytest.raises(ValueError, match=re.escape(str(path))):
    prepare.prepare(str(work_dir), str(tmp_path / 'tfds'), '2020', SIZE, num_threads=2)


@pytest.mark.parametrize('policy', ['error', 'skip'])
def test_missing_label_folder_names_the_folder(work_dir, policy):
  folder = work_dir / 'train' / 'labels' / 'planter_skip'
  shutil.rmtree(folder)
  with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
    data.create_source(data_config(work_dir, on_bad_example=policy), 'train')


def test_empty_split_names_the_folder(work_dir):
  folder = work_dir / 'val' / 'images' / 'rgb'
  for path in (work_dir / 'val').rglob('*.*'):
    path.unlink()
  with pytest.raises(ValueError, match=re.escape(str(folder))):
    data.create_source(data_config(work_dir), 'val')
  shutil.rmtree(work_dir / 'test')
  with pytest.raises(FileNotFoundError, match=re.escape(str(work_dir / 'test'))):
    data.create_source(data_config(work_dir), 'test')


def test_unknown_version_and_split_are_named():
  with pytest.raises(ValueError, match=r'data\.version=.2022'):
    data.class_names('2022')
  with pytest.raises(ValueError, match=r"split='validation'"):
    layout.check_split('validation')


def test_decoding_fully_loads_images():
  """A JPEG whose header is intact but whose data is cut must fail, not decode partially."""
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), np.uint8)).save(
      buffer, 'JPEG')
  content = buffer.getvalue()
  Image.open(io.BytesIO(content[:len(content) // 2]))  # opening alone does not notice
  blobs = {'rgb': content[:len(content) // 2], 'nir': b'', 'boundary': b'', 'mask': b'',
           'labels': []}
  where = {'rgb': 'RGB-FILE', 'nir': 'N', 'boundary': 'B', 'mask': 'M', 'labels': []}
  with pytest.raises(layout.BadFileError, match='RGB-FILE: cannot decode image'):
    layout.decode_tile('x', blobs, NAMES, SIZE, where)
