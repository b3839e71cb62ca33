"""Prediction: D4 / flips TTA equivariance, submission PNGs, overlays, official mIoU, errors."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from agrivision_jax import data as data_lib
from agrivision_jax import predict
from agrivision_jax import tta


def _dihedral_images(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.slow
def test_d4_tta_output_is_equivariant_to_every_dihedral_transform(tiny_model):
  _, _, forward = tiny_model
  images = _dihedral_images((6, 32, 32, 4), 0)
  plain = forward(images)
  averaged = tta.tta_logits(forward, images, 'd4')
  for transform in tta.transforms_for('d4'):
    np.testing.assert_allclose(tta.tta_logits(forward, transform.forward(images), 'd4'),
                               transform.forward(averaged), atol=2e-5, rtol=1e-5)
  # The model alone is not equivariant (so the check above can fail) ...
  rotated = tta.Dihedral(1, False)
  assert np.abs(forward(rotated.forward(images)) - rotated.forward(plain)).max() > 1e-3
  # ... and every transform is undone exactly: inverse(forward(x)) == x.
  for transform in tta.transforms_for('d4'):
    np.testing.assert_array_equal(transform.inverse(transform.forward(images)), images)
  assert len({(t.k, t.flip) for t in tta.transforms_for('d4')}) == 8


def test_flips_tta_is_equivariant_to_flips_on_non_square_input(tiny_model):
  _, _, forward = tiny_model
  images = _dihedral_images((2, 32, 48, 4), 1)
  averaged = tta.tta_logits(forward, images, 'flips')
  assert averaged.shape == (2, 32, 48, 7)
  flips = {'h': lambda x: jnp.flip(x, 2), 'v': lambda x: jnp.flip(x, 1),
           'hv': lambda x: jnp.flip(x, (1, 2))}
  for flip in flips.values():
    np.testing.assert_allclose(tta.tta_logits(forward, flip(images), 'flips'), flip(averaged),
                               atol=2e-5, rtol=1e-5)
  plain = forward(images)
  assert np.abs(forward(flips['h'](images)) - flips['h'](plain)).max() > 1e-3
  np.testing.assert_array_equal(tta.tta_logits(forward, images, 'none'), plain)


def official_miou(predictions: list[np.ndarray], examples: list[dict]) -> float:
  """The challenge rule, pixel by pixel: x in Y -> M[y, y] += 1 for y in Y, else M[x, y] += 1;
  IoU_c = M[c, c] / (row sum + column sum - M[c, c]), averaged over the classes that occur."""
  num_classes = examples[0]['labels'].shape[-1]
  matrix = np.zeros((num_classes, num_classes), np.int64)
  for prediction, example in zip(predictions, examples):
    for i, j in zip(*np.nonzero(example['valid'])):
      label_set = np.flatnonzero(example['labels'][i, j])
      x = prediction[i, j]
      for y in label_set:
        matrix[y if x in label_set else x, y] += 1
  diagonal = np.diag(matrix)
  union = matrix.sum(0) + matrix.sum(1) - diagonal
  return float(np.mean(diagonal[union > 0] / union[union > 0]))   # classes never seen: no IoU


@pytest.fixture
def trained_workdir(tiny_workdir, tmp_path):
  """A copy of the session's tiny workdir (conftest.tiny_workdir): (config, workdir)."""
  config, workdir = tiny_workdir
  copy = str(tmp_path / 'workdir')
  shutil.copytree(workdir, copy)
  return config.copy_and_resolve_references(), copy


@pytest.mark.slow
def test_predict_val_writes_index_pngs_overlays_and_the_official_miou(trained_workdir, tiny_model):
  config, workdir = trained_workdir
  config = config.copy_and_resolve_references()
  config.predict.update(dict(split='val', tta='flips', num_overlays=2))
  result = predict.run(config, workdir)

  source = data_lib.create_source(config.data, 'val')
  examples = [source[i] for i in range(len(source))]
  out_dir = os.path.join(workdir, 'predictions', 'val')
  assert sorted(os.listdir(out_dir)) == sorted(f"{e['id']}.png" for e in examples)
  predictions = []
  for example in examples:
    with Image.open(os.path.join(out_dir, f"{example['id']}.png")) as image:
      assert image.mode == 'L' and image.size == (32, 32)
      predictions.append(np.asarray(image))
    assert predictions[-1].dtype == np.uint8 and predictions[-1].max() <= 6
  # The PNGs are the argmax of the flips-averaged logits of the normalised tiles.
  _, _, forward = tiny_model
  images = jnp.asarray(np.stack([data_lib.normalize(e['image'], 'nrgb') for e in examples]))
  logits = np.asarray(tta.tta_logits(forward, images, 'flips'))
  top2 = np.sort(logits, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4
  np.testing.assert_array_equal(np.stack(predictions)[clear], logits.argmax(-1)[clear])
  assert len(np.unique(np.stack(predictions))) > 1
  # The reported mIoU is the official one of exactly these PNGs.
  assert result['num_tiles'] == len(examples) and result['tta'] == 'flips'
  np.testing.assert_allclose(result['miou'], official_miou(predictions, examples), rtol=1e-9)
  with open(os.path.join(workdir, 'predictions', 'val_tta_flips.json')) as f:
    assert json.load(f)['miou'] == result['miou']
  overlays = sorted(os.listdir(os.path.join(workdir, 'predictions', 'val_overlays')))
  assert overlays == sorted(f"{e['id']}.png" for e in examples[:2])


@pytest.mark.slow
def test_predict_test_split_without_labels(trained_workdir):
  config, workdir = trained_workdir
  config = config.copy_and_resolve_references()
  config.predict.update(dict(split='test', tta='none', num_overlays=1))
  result = predict.run(config, workdir)
  source = data_lib.create_source(config.data, 'test')
  assert not source[0]['labels'].any()   # the test split really has no labels
  names = sorted(os.listdir(os.path.join(workdir, 'predictions', 'test')))
  assert names == sorted(f"{source[i]['id']}.png" for i in range(len(source)))
  assert 'miou' not in result and result['num_tiles'] == len(source) == 3
  assert not os.path.exists(os.path.join(workdir, 'predictions', 'test_tta_none.json'))
  assert len(os.listdir(os.path.join(workdir, 'predictions', 'test_overlays'))) == 1


def test_missing_checkpoint_is_a_clear_error(tiny_experiment_config, tmp_path):
  config = tiny_experiment_config(str(tmp_path / 'av'))
  with pytest.raises(FileNotFoundError, match=f'no checkpoint directory {tmp_path}'):
    predict.run(config, str(tmp_path / 'empty_workdir'))


def test_bad_tta_mode_is_named(tiny_experiment_config, tmp_path):
  config = tiny_experiment_config(str(tmp_path / 'av'))
  config.predict.tta = 'd8'
  with pytest.raises(ValueError, match='config.predict.tta'):
    predict.run(config, str(tmp_path))
