"""grain pipelines and augmentation: sharding, per-epoch shuffle, resume, eval padding, warps."""

import json
import math

import grain
import ml_collections
import numpy as np
import pytest
import torch

from agrivision_jax import data
from agrivision_jax.data import augment

SIZE = 32
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def data_config(data_dir, **overrides):
  """config.data with the contract's fields, on a synthetic dataset of 12 / 5 / 3 tiles."""
  config = ml_collections.ConfigDict(dict(
      source='synthetic', data_dir=str(data_dir), version='2020', modality='nrgb',
      image_size=SIZE, batch_size=6, eval_batch_size=4, num_workers=0, on_bad_example='error',
      augment=dict(shift_scale_aspect=True, hflip=True, vflip=True, rot90=True),
      synthetic=dict(num_train=12, num_val=5, num_test=3, size=SIZE, seed=1)))
  config.update(overrides)
  return config


def no_augment(config):
  config.augment.update(dict(shift_scale_aspect=False, hflip=False, vflip=False, rot90=False))
  return config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline') / 'synthetic'
  data.create_source(data_config(root), 'train')  # generates the dataset
  return root


def id_by_image(config, split):
  """Normalised image bytes -> tile id, from the source (no augmentation)."""
  source = data.create_source(config, split)
  return {data.normalize(source[i]['image'], config.modality).tobytes(): source[i]['id']
          for i in range(len(source))}


def batch_ids(batch, lookup):
  return [lookup[image.tobytes()] for image in batch['image']]


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])


def test_normalize_matches_hand_computed_values():
  image = np.array([[[0, 128, 255, 64]]], np.uint8)
  nrgb = data.normalize(image, 'nrgb')
  expected = [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225,
              (64 / 255 - 0.485) / 0.229]
  assert nrgb.dtype == np.float32 and nrgb.shape == (1, 1, 4) and nrgb.flags.c_contiguous
  np.testing.assert_allclose(nrgb[0, 0], expected, rtol=1e-6)
  np.testing.assert_allclose(data.normalize(image, 'rgb')[0, 0], expected[:3], rtol=1e-6)
  np.testing.assert_allclose(data.normalize(image, 'nir')[0, 0], [expected[3]] * 3, rtol=1e-6)


@pytest.mark.parametrize('modality,channels', [('nrgb', 4), ('rgb', 3), ('nir', 3)])
def test_train_batches_follow_the_contract(data_dir, modality, channels):
  config = data_config(data_dir, modality=modality)
  batch = next(data.create_train_iterator(config, seed=0, process_index=1, process_count=2))
  assert sorted(batch) == ['image', 'labels', 'valid']
  assert batch['image'].shape == (3, SIZE, SIZE, channels) and batch['image'].dtype == np.float32
  assert batch['labels'].shape == (3, SIZE, SIZE, 7) and batch['labels'].dtype == np.uint8
  assert batch['valid'].shape == (3, SIZE, SIZE) and batch['valid'].dtype == bool
  # grain worker processes hand over only C-contiguous arrays through shared memory.
  assert all(array.flags.c_contiguous for array in batch.values())
  assert set(np.unique(batch['labels'])) <= {0.0, 1.0}
  assert not batch['labels'][~batch['valid']].any()
  # Every valid pixel has at least one class: background where no pattern is.
  assert (batch['labels'].sum(-1)[batch['valid']] >= 1).all()
  if modality == 'nir':
    np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])


def test_processes_read_every_example_once_per_epoch(data_dir):
  config = no_augment(data_config(data_dir))
  lookup = id_by_image(config, 'train')
  count, batch_size = 3, config.batch_size // 3
  batches_per_epoch = len(lookup) // config.batch_size
  epochs = {0: [], 1: []}
  for process in range(count):
    iterator = data.create_train_iterator(config, seed=7, process_index=process,
                                          process_count=count)
    for epoch in (0, 1):
      for _ in range(batches_per_epoch):
        batch = next(iterator)
        assert len(batch['image']) == batch_size
        epochs[epoch].append(batch_ids(batch, lookup))
  for epoch, batches in epochs.items():
    ids = [i for batch in batches for i in batch]
    assert sorted(ids) == sorted(lookup.values()), epoch
  assert epochs[0] != epochs[1]  # reshuffled every epoch
  other_seed = data.create_train_iterator(config, seed=8, process_index=0, process_count=count)
  assert batch_ids(next(other_seed), lookup) != epochs[0][0]


def test_resume_from_saved_state_gives_the_identical_next_batches(data_dir):
  config = data_config(data_dir)
  iterator = data.create_train_iterator(config, seed=3, process_index=0, process_count=1)
  for _ in range(3):  # crosses the first epoch boundary (12 examples, 6 per batch)
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(2)]
  resumed = data.create_train_iterator(config, seed=3, process_index=0, process_count=1)
  resumed.set_state(state)
  for batch in expected:
    assert_batches_equal(next(resumed), batch)


@pytest.mark.slow
def test_resume_through_orbax_with_worker_processes(data_dir, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  config = data_config(data_dir, num_workers=2)
  iterator = data.create_train_iterator(config, seed=5, process_index=0, process_count=1)
  for _ in range(2):
    next(iterator)
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data_iter',)) as manager:
    manager.save(2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
  expected = [next(iterator) for _ in range(2)]
  iterator.close()
  resumed = data.create_train_iterator(config, seed=5, process_index=0, process_count=1)
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data_iter',)) as manager:
    manager.restore(
        2, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(resumed)))
  for batch in expected:
    assert_batches_equal(next(resumed), batch)
  resumed.close()
  # Workers make whole batches: the stream does not depend on num_workers.
  in_process = data.create_train_iterator(data_config(data_dir), seed=5, process_index=0,
                                          process_count=1)
  for _ in range(2):
    next(in_process)
  for batch in expected:
    assert_batches_equal(next(in_process), batch)


def test_eval_covers_every_example_once_and_pads_the_last_batch(data_dir):
  config = data_config(data_dir)
  source = data.create_source(config, 'val')
  references = {source[i]['id']: source[i] for i in range(len(source))}
  count, batch_size = 2, config.eval_batch_size // 2
  seen = []
  for process in range(count):
    batches = list(data.create_eval_iterator(config, 'val', process, count))
    assert len(batches) == math.ceil(math.ceil(len(source) / count) / batch_size)
    local_ids = [i for batch in batches for i in batch['id']]
    assert local_ids == sorted(local_ids, key=lambda i: i == '')  # padding only at the end
    for batch in batches:
      assert batch['image'].shape == (batch_size, SIZE, SIZE, 4)
      for j, tile_id in enumerate(batch['id']):
        if not tile_id:  # padding
          assert not batch['valid'][j].any() and not batch['labels'][j].any()
          continue
        seen.append(tile_id)
        reference = references[tile_id]
        np.testing.assert_array_equal(batch['image'][j], data.normalize(reference['image'], 'nrgb'))
        np.testing.assert_array_equal(batch['valid'][j], reference['valid'])
        np.testing.assert_array_equal(batch['labels'][j],
                                      reference['labels'] * reference['valid'][..., None])
  assert sorted(seen) == sorted(references)
  assert len(seen) < count * len(batches) * batch_size  # 5 examples: padding was needed


# ---------------------------------------------------------------------------------------------
# Augmentation.

def torch_warp_reference(image, labels, valid, sx, sy, dx, dy):
  """The authors' warp rebuilt from their corner correspondences, sampled with grid_sample."""
  height, width = valid.shape
  box0 = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float64)
  box1 = (box0 - [width / 2, height / 2]) * [sx, sy] + [width / 2 + dx, height / 2 + dy]
  affine = np.linalg.lstsq(np.c_[box0, np.ones(4)], box1, rcond=None)[0].T
  inverse = np.linalg.inv(np.vstack([affine, [0, 0, 1]]))
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
  src_x, src_y, _ = np.einsum('ij,jhw->ihw', inverse, np.stack([xs, ys, np.ones_like(xs)]))
  grid = torch.from_numpy(np.stack([2 * src_x / (width - 1) - 1, 2 * src_y / (height - 1) - 1],
                                   -1)[None])

  def sample(array, mode):
    tensor = torch.from_numpy(np.moveaxis(array.astype(np.float64), -1, 0)[None])
    out = torch.nn.functional.grid_sample(tensor, grid, mode=mode, padding_mode='zeros',
                                          align_corners=True)
    return np.moveaxis(out[0].numpy(), 0, -1)

  ties = (np.abs(src_x - np.floor(src_x) - 0.5) < 1e-6) | (np.abs(src_y - np.floor(src_y) - 0.5)
                                                             < 1e-6)
  return (sample(image, 'bilinear'), sample(labels, 'nearest'),
          sample(valid[..., None], 'nearest')[..., 0] > 0.5, ties)


@pytest.mark.parametrize('seed', range(4))
def test_shift_scale_aspect_matches_grid_sample_reference(seed):
  rng = np.random.default_rng(seed)
  height, width = 37, 52
  image = rng.integers(0, 256, (height, width, 4), np.uint8)
  labels = rng.integers(0, 2, (height, width, 7), np.uint8)
  valid = rng.random((height, width)) < 0.8
  sx, sy, dx, dy = augment.sample_shift_scale_aspect(rng, height, width)
  got_image, got_labels, got_valid = augment.shift_scale_aspect(image, labels, valid, sx, sy,
                                                                dx, dy)
  ref_image, ref_labels, ref_valid, ties = torch_warp_reference(image, labels, valid, sx, sy, dx,
                                                                dy)
  assert got_image.dtype == np.uint8 and got_labels.dtype == np.uint8 and got_valid.dtype == bool
  assert np.abs(got_image.astype(np.float64) - ref_image).max() <= 0.5 + 1e-6
  np.testing.assert_array_equal(got_labels[~ties], ref_labels[~ties])
  np.testing.assert_array_equal(got_valid[~ties], ref_valid[~ties])


def test_shift_moves_pixels_and_the_zero_border_becomes_invalid():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (20, 24, 4), np.uint8)
  labels = rng.integers(0, 2, (20, 24, 3), np.uint8)
  valid = np.ones((20, 24), bool)
  out_image, out_labels, out_valid = augment.shift_scale_aspect(image, labels, valid, 1.0, 1.0,
                                                                5, -3)
  np.testing.assert_array_equal(out_image[:17, 5:], image[3:, :19])
  np.testing.assert_array_equal(out_labels[:17, 5:], labels[3:, :19])
  assert out_valid[:17, 5:].all()
  assert not out_valid[:, :5].any() and not out_valid[17:].any()
  assert not out_image[:, :5].any() and not out_labels[17:].any()
  identity = augment.shift_scale_aspect(image, labels, valid, 1.0, 1.0, 0, 0)
  for got, want in zip(identity, (image, labels, valid)):
    np.testing.assert_array_equal(got, want)


def test_sampled_parameters_follow_the_authors_limits():
  rng = np.random.default_rng(1)
  draws = np.array([augment.sample_shift_scale_aspect(rng, 30, 40) for _ in range(2000)])
  sx, sy, dx, dy = draws.T
  scale, aspect = np.sqrt(sx * sy), sx / sy
  assert 0 < scale.min() < 0.05 and 1.95 < scale.max() < 2
  assert 0 < aspect.min() < 0.05 and 1.95 < aspect.max() < 2
  assert set(dx) <= set(range(-40, 41)) and dx.min() < -36 and dx.max() > 36
  assert set(dy) <= set(range(-30, 31)) and dy.min() < -27 and dy.max() > 27


class _FixedRng:
  """Stands in for np.random.Generator: random() returns a fixed value; no warp is drawn."""

  def __init__(self, value):
    self.value = value

  def random(self):
    return self.value


@pytest.mark.parametrize('switch,transform', [
    ('hflip', lambda a: a[:, ::-1]), ('vflip', lambda a: a[::-1]), ('rot90', np.rot90)])
def test_flips_and_rot90(switch, transform):
  rng = np.random.default_rng(2)
  example = {'image': rng.integers(0, 256, (9, 9, 4), np.uint8),
             'labels': rng.integers(0, 2, (9, 9, 7), np.uint8),
             'valid': rng.random((9, 9)) < 0.5, 'id': 'x'}
  switches = ml_collections.ConfigDict(dict(shift_scale_aspect=False, hflip=False, vflip=False,
                                            rot90=False))
  switches[switch] = True
  applied = augment.augment(example, switches, _FixedRng(0.0))
  kept = augment.augment(example, switches, _FixedRng(0.75))
  assert applied['id'] == 'x'
  for key in ('image', 'labels', 'valid'):
    np.testing.assert_array_equal(applied[key], transform(example[key]))
    np.testing.assert_array_equal(kept[key], example[key])


def test_each_augmentation_fires_half_of_the_time():
  example = {'image': np.arange(4 * 4 * 4, dtype=np.uint8).reshape(4, 4, 4),
             'labels': np.zeros((4, 4, 7), np.uint8), 'valid': np.ones((4, 4), bool)}
  only_hflip = ml_collections.ConfigDict(dict(shift_scale_aspect=False, hflip=True, vflip=False,
                                              rot90=False))
  rng = np.random.default_rng(3)
  flipped = sum(not np.array_equal(augment.augment(example, only_hflip, rng)['image'],
                                   example['image']) for _ in range(400))
  assert 150 < flipped < 250

