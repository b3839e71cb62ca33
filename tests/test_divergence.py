"""Feature divergence: KL formula, streaming Gaussian fit, layer capture, end-to-end run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from agrivision_jax import data as data_lib
from agrivision_jax import experiment
from agrivision_jax import divergence
from agrivision_jax import models


def _kl_by_integration(mean_p, var_p, mean_q, var_q):
  """KL(P||Q) = integral of p log(p/q), trapezoid rule on a grid covering both densities."""
  std_p, std_q = np.sqrt(var_p), np.sqrt(var_q)
  low = min(mean_p - 14 * std_p, mean_q - 14 * std_q)
  high = max(mean_p + 14 * std_p, mean_q + 14 * std_q)
  x = np.linspace(low, high, 400_001)
  log_p = -0.5 * ((x - mean_p) / std_p) ** 2 - np.log(std_p * np.sqrt(2 * np.pi))
  log_q = -0.5 * ((x - mean_q) / std_q) ** 2 - np.log(std_q * np.sqrt(2 * np.pi))
  return np.trapezoid(np.exp(log_p) * (log_p - log_q), x)


@pytest.mark.parametrize('case', range(6))
def test_kl_matches_numerical_integration(case):
  rng = np.random.default_rng([0, case])
  mean_p, mean_q = rng.normal(0, 2, size=2)
  var_p, var_q = rng.uniform(0.05, 3.0, size=2)
  expected = _kl_by_integration(mean_p, var_p, mean_q, var_q)
  np.testing.assert_allclose(divergence.gaussian_kl(mean_p, var_p, mean_q, var_q), expected,
                             rtol=1e-6, atol=1e-9)
  expected_symmetric = expected + _kl_by_integration(mean_q, var_q, mean_p, var_p)
  np.testing.assert_allclose(divergence.symmetric_kl(mean_p, var_p, mean_q, var_q),
                             expected_symmetric, rtol=1e-6, atol=1e-9)


def test_symmetric_kl_is_symmetric_and_zero_for_identical_statistics():
  rng = np.random.default_rng(1)
  mean_a, mean_b = rng.normal(size=(2, 11))
  var_a, var_b = rng.uniform(0.1, 2.0, size=(2, 11))
  forward = divergence.symmetric_kl(mean_a, var_a, mean_b, var_b)
  np.testing.assert_allclose(forward, divergence.symmetric_kl(mean_b, var_b, mean_a, var_a),
                             rtol=1e-14)
  assert np.all(forward > 0)
  np.testing.assert_array_equal(divergence.symmetric_kl(mean_a, var_a, mean_a, var_a), 0.0)
  # KL alone is not symmetric, so the test above can fail.
  assert not np.allclose(divergence.gaussian_kl(mean_a, var_a, mean_b, var_b),
                         divergence.gaussian_kl(mean_b, var_b, mean_a, var_a))


@pytest.mark.parametrize('batch_size', [1, 3, 8, 37])
def test_streaming_statistics_equal_direct_computation(batch_size):
  rng = np.random.default_rng(2)
  # A large offset and a small spread: a naive sum-of-squares would lose every digit here.
  samples = (1e4 + rng.normal(0, 1e-2, size=(37, 5)) * np.arange(1, 6)).astype(np.float32)
  stats = divergence.ChannelStats.empty(5)
  for start in range(0, len(samples), batch_size):
    stats = stats.update(samples[start:start + batch_size])
  reference = samples.astype(np.float64)
  assert stats.count == 37
  np.testing.assert_allclose(stats.mean, reference.mean(axis=0), rtol=1e-13)
  np.testing.assert_allclose(stats.variance(), reference.var(axis=0, ddof=1), rtol=1e-8)


def test_variance_needs_two_images():
  with pytest.raises(ValueError, match='num_images'):
    divergence.ChannelStats.from_samples(np.ones((1, 3))).variance()


def test_layer_divergence_floors_variances_relative_to_the_layer():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(20, 5))
  b = rng.normal(1.0, 2.0, size=(20, 5))
  a[:, 3] = b[:, 3] = 0.0   # a ReLU channel dead under both inputs
  b[:, 4] = 0.0             # ... and one dead under B only: its plain KL is infinite
  stats_a, stats_b = (divergence.ChannelStats.from_samples(x) for x in (a, b))
  value, below = divergence.layer_divergence(stats_a, stats_b, 0.01)
  var_a, var_b = a.var(axis=0, ddof=1), b.var(axis=0, ddof=1)
  floor = 0.01 * np.mean(np.concatenate([var_a, var_b]))
  expected = [_kl_by_integration(a[:, c].mean(), var_a[c] + floor, b[:, c].mean(), var_b[c] + floor)
              + _kl_by_integration(b[:, c].mean(), var_b[c] + floor, a[:, c].mean(), var_a[c] + floor)
              for c in range(5)]
  np.testing.assert_allclose(value, np.mean(expected), rtol=1e-6)
  assert below == 2
  # Like the KL itself, the result does not change when the layer's activations are rescaled.
  scaled = divergence.layer_divergence(divergence.ChannelStats.from_samples(1e3 * a),
                                       divergence.ChannelStats.from_samples(1e3 * b), 0.01)
  np.testing.assert_allclose(scaled[0], value, rtol=1e-9)
  # Without a floor the formula is undefined for the dead channels; identical fits give 0.
  assert divergence.layer_divergence(stats_a, stats_b, 0.0) == (None, 2)
  assert divergence.layer_divergence(stats_a, stats_a, 0.01)[0] == 0.0


def test_var_floor_zero_is_the_papers_formula():
  """Without a floor: the mean over channels of KL(A||B) + KL(B||A) of the Gaussians fitted to
  each channel's samples (unbiased variance), the KL by numerical integration."""
  rng = np.random.default_rng(8)
  a = rng.normal(0.3, 1.0, size=(9, 4)) * np.arange(1, 5)
  b = rng.normal(1.0, 2.0, size=(11, 4))
  value, below = divergence.layer_divergence(divergence.ChannelStats.from_samples(a),
                                             divergence.ChannelStats.from_samples(b), 0.0)
  expected = [_kl_by_integration(a[:, c].mean(), a[:, c].var(ddof=1), b[:, c].mean(),
                                 b[:, c].var(ddof=1))
              + _kl_by_integration(b[:, c].mean(), b[:, c].var(ddof=1), a[:, c].mean(),
                                   a[:, c].var(ddof=1))
              for c in range(4)]
  np.testing.assert_allclose(value, np.mean(expected), rtol=1e-6)
  assert below == 0
  # The default floor changes the value, so the test above can tell the two apart.
  floored, _ = divergence.layer_divergence(divergence.ChannelStats.from_samples(a),
                                           divergence.ChannelStats.from_samples(b), 0.01)
  assert abs(floored - value) > 1e-4 * value


@pytest.mark.parametrize('in_channels, pairing, input_a, input_b', [
    (3, 'replicate', 'RGB', 'NNN'), (4, 'replicate', 'RGBR', 'NNNN'), (4, 'zero', 'RGB0', 'NNN0')])
def test_modality_inputs_for_each_pairing(in_channels, pairing, input_a, input_b):
  images = np.random.default_rng(4).normal(size=(2, 5, 7, 4)).astype(np.float32)
  channels = {name: images[..., c:c + 1] for c, name in enumerate('RGBN')}
  channels['0'] = np.zeros_like(channels['N'])
  a, b = divergence.modality_inputs(jnp.asarray(images), in_channels, pairing)
  np.testing.assert_array_equal(a, np.concatenate([channels[c] for c in input_a], axis=-1))
  np.testing.assert_array_equal(b, np.concatenate([channels[c] for c in input_b], axis=-1))


def test_unknown_pairing_is_named():
  images = np.zeros((2, 5, 7, 4), np.float32)
  with pytest.raises(ValueError, match='config.divergence.pairing'):
    divergence.modality_inputs(jnp.asarray(images), 4, 'mean')


def _area_weights_brute_force(valid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Valid fractions by supersampling: repeating every pixel h (w) times makes each output cell
  exactly H (W) fine cells long."""
  (h, w), (_, height, width) = size, valid.shape
  fine = np.repeat(np.repeat(valid.astype(np.float64), h, axis=1), w, axis=2)
  return fine.reshape(len(valid), h, height, w, width).mean(axis=(2, 4))


@pytest.mark.parametrize('size', [(20, 24), (10, 12), (5, 6), (3, 3), (7, 5)])
def test_downsample_valid_is_the_valid_area_fraction(size):
  valid = np.random.default_rng(5).uniform(size=(2, 40, 48)) > 0.4
  np.testing.assert_allclose(divergence.downsample_valid(jnp.asarray(valid), size),
                             _area_weights_brute_force(valid, size), atol=1e-6)


def test_downsample_valid_is_the_block_mean_where_the_stride_divides():
  valid = np.random.default_rng(5).uniform(size=(2, 40, 48)) > 0.4
  # Where the stride divides, a feature pixel's weight is the mean of its block.
  np.testing.assert_allclose(divergence.downsample_valid(jnp.asarray(valid), (10, 12)),
                             valid.reshape(2, 10, 4, 12, 4).mean(axis=(2, 4)), atol=1e-6)


def _split_images(count: int = 8, seed: int = 6):
  """``count`` random 40x48 images; the last two are one without any valid pixel and padding."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(count, 40, 48, 4)).astype(np.float32)
  images[..., 3] = 0.5 * images[..., 3] + 0.8   # NIR statistics differ from RGB's
  rows, cols = np.mgrid[:40, :48]
  centres = rng.uniform(0, 48, size=(count, 2))
  valid = (rows - centres[:, :1, None]) ** 2 + (cols - centres[:, 1:, None]) ** 2 < 25 ** 2
  valid[-2:] = False
  ids = np.array([f'tile{i}' for i in range(count - 1)] + [''])
  return images, valid, ids


def _batches(images, valid, ids, batch_size):
  return [{'image': images[i:i + batch_size], 'valid': valid[i:i + batch_size],
           'id': ids[i:i + batch_size]} for i in range(0, len(images), batch_size)]


@pytest.fixture(scope='module')
def tiny_network(tiny_model_config, random_variables):
  model = models.model_from_spec(tiny_model_config())
  return model, random_variables(model)


@pytest.mark.slow
def test_streaming_statistics_match_direct_computation_for_any_batch_size(tiny_network):
  model, variables = tiny_network
  mesh = experiment.create_mesh(jax.devices()[:1])
  images, valid, ids = _split_images()
  results = [divergence.accumulate_statistics(model, variables, _batches(images, valid, ids, size),
                                              mesh, pairing='replicate', valid_only=True)[:2]
             for size in (2, 4)]

  # Reference: every kept image's features at once, weighted means and variances in float64.
  kept = slice(0, 6)
  rgbr = np.concatenate([images[kept, ..., :3], images[kept, ..., :1]], axis=-1)
  nir4 = np.repeat(images[kept, ..., 3:], 4, axis=-1)
  features = models.capture_layer_outputs(model, variables, jnp.asarray(np.concatenate([rgbr, nir4])))
  for name, layer_features in features.items():
    layer_features = np.asarray(layer_features, np.float64)
    weights = _area_weights_brute_force(np.concatenate([valid[kept]] * 2),
                                        layer_features.shape[1:3])[..., None]
    means = (layer_features * weights).sum(axis=(1, 2)) / weights.sum(axis=(1, 2))
    for stats_a, stats_b in results:
      for stats, reference in ((stats_a[name], means[:6]), (stats_b[name], means[6:])):
        assert stats.count == 6
        np.testing.assert_allclose(stats.mean, reference.mean(axis=0), rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(stats.variance(), reference.var(axis=0, ddof=1), rtol=2e-4,
                                   atol=1e-7)
  assert list(results[0][0]) == models.backbone_layer_names(model.arch)


def _brute_force_batch_pooling(model, variables, images, valid, ids, batch_size, valid_only):
  """The authors' statistics by brute force: every image's features at once; per batch of
  ``batch_size`` images, each channel's mean over the kept images' pixels (weighted by the valid
  area under each feature pixel with ``valid_only``); then the mean and unbiased variance of
  those batch means across the batches. Returns {layer: (mean_a, var_a, mean_b, var_b)}."""
  rgbr = np.concatenate([images[..., :3], images[..., :1]], axis=-1)
  nir4 = np.repeat(images[..., 3:], 4, axis=-1)
  features = models.capture_layer_outputs(model, variables,
                                          jnp.asarray(np.concatenate([rgbr, nir4])))
  kept = (ids != '') & (valid.any(axis=(1, 2)) if valid_only else True)
  count = len(images)
  result = {}
  for name, layer_features in features.items():
    layer_features = np.asarray(layer_features, np.float64)
    if valid_only:
      weights = _area_weights_brute_force(valid, layer_features.shape[1:3])[..., None]
    else:
      weights = np.ones(layer_features.shape[:3] + (1,))[:count]
    fits = []
    for modality in (layer_features[:count], layer_features[count:]):
      batch_means = []
      for start in range(0, count, batch_size):
        rows = np.flatnonzero(kept[start:start + batch_size]) + start
        if len(rows):
          batch_means.append((modality[rows] * weights[rows]).sum(axis=(0, 1, 2))
                             / weights[rows].sum())
      batch_means = np.stack(batch_means)
      fits += [batch_means.mean(axis=0), batch_means.var(axis=0, ddof=1)]
    result[name] = fits
  return result


@pytest.mark.parametrize('batch_size, valid_only', [(2, True), (4, True), (4, False)])
def test_batch_pooling_matches_brute_force(tiny_network, batch_size, valid_only):
  model, variables = tiny_network
  mesh = experiment.create_mesh(jax.devices()[:1])
  images, valid, ids = _split_images()
  stats_a, stats_b, used = divergence.accumulate_statistics(
      model, variables, _batches(images, valid, ids, batch_size), mesh, pairing='replicate',
      valid_only=valid_only, pooling='batch')
  assert used == (6 if valid_only else 7)
  expected = _brute_force_batch_pooling(model, variables, images, valid, ids, batch_size,
                                        valid_only)
  assert list(stats_a) == list(expected)
  for name, (mean_a, var_a, mean_b, var_b) in expected.items():
    assert stats_a[name].count == stats_b[name].count == (3 if batch_size == 2 else 2)
    np.testing.assert_allclose(stats_a[name].mean, mean_a, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(stats_b[name].mean, mean_b, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(stats_a[name].variance(), var_a, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(stats_b[name].variance(), var_b, rtol=2e-4, atol=1e-7)


def test_identical_inputs_give_zero_divergence_at_every_layer(tiny_network):
  model, variables = tiny_network
  mesh = experiment.create_mesh(jax.devices()[:1])
  images, valid, ids = _split_images(seed=7)
  stats = divergence.accumulate_statistics(model, variables, _batches(images, valid, ids, 4), mesh,
                                           pairing='replicate', valid_only=True)[:2]
  different = divergence.summarize(*stats, var_floor=0.01)
  assert all(layer['divergence'] > 1e-3 for layer in different)
  images[..., :3] = images[..., 3:]   # RGB := NIR, so A = (R,G,B,R) equals B = (N,N,N,N)
  stats = divergence.accumulate_statistics(model, variables, _batches(images, valid, ids, 4), mesh,
                                           pairing='replicate', valid_only=True)[:2]
  layers = divergence.summarize(*stats, var_floor=0.01)
  assert [layer['name'] for layer in layers] == models.backbone_layer_names(model.arch)
  np.testing.assert_allclose([layer['divergence'] for layer in layers], 0.0, atol=1e-9)


@pytest.mark.parametrize('arch, count', [('resnet101', 34), ('resnet50', 17)])
def test_every_block_is_captured(tiny_model_config, arch, count):
  model = models.model_from_spec(tiny_model_config(arch=arch, in_channels=3, ibn_mode='a'))
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  means_a, means_b, areas = jax.eval_shape(
      lambda v, x, m: divergence.channel_means(model, v, x, m, pairing='replicate',
                                               valid_only=True),
      variables, jax.ShapeDtypeStruct((2, 32, 48, 4), jnp.float32),
      jax.ShapeDtypeStruct((2, 32, 48), jnp.bool_))
  names = models.backbone_layer_names(arch)
  # (pytrees come back with sorted keys; accumulate_statistics restores the layer order)
  assert len(names) == count and sorted(means_a) == sorted(means_b) == sorted(names)
  width = 4
  for name in names:
    stage = 0 if name == 'stem' else int(name[5])
    channels = width if stage == 0 else 4 * width * 2 ** (stage - 1)
    assert means_a[name].shape == means_b[name].shape == (2, channels)
    assert areas[name].shape == (2,)


@pytest.mark.slow
def test_run_writes_json_stats_and_plot(tiny_experiment_config, random_variables,
                                        synthetic_data_dir, tmp_path, monkeypatch):
  config = tiny_experiment_config(synthetic_data_dir)
  config.divergence.update(dict(random_init=True, valid_only=True))
  # models.init_variables compiles the whole network (a minute on 2 shared cores); random weights
  # of the same shapes serve as the fresh initialisation here.
  monkeypatch.setattr(models, 'init_variables', lambda model, key, shape: random_variables(model))
  result = divergence.run(config, str(tmp_path))

  source = data_lib.create_source(config.data, 'val')
  with_valid = sum(bool(source[i]['valid'].any()) for i in range(len(source)))
  with open(tmp_path / 'divergence.json') as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(result))
  assert written['settings']['num_images'] == written['settings']['num_samples'] == with_valid > 2
  assert written['settings']['pooling'] == 'image'
  assert written['settings']['input_a'] == 'R,G,B,R' and written['settings']['random_init']
  names = models.backbone_layer_names(config.model.arch)
  assert [layer['name'] for layer in written['layers']] == names
  assert [layer['index'] for layer in written['layers']] == list(range(len(names)))
  assert written['layers'][0]['channels'] == 4 and written['layers'][-1]['channels'] == 128
  assert all(np.isfinite(layer['divergence']) and layer['divergence'] > 0
             for layer in written['layers'])
  stats = np.load(tmp_path / 'divergence_stats.npz')
  assert int(stats['count']) == with_valid and stats['layer4_2/var_b'].shape == (128,)
  with Image.open(tmp_path / 'divergence.png') as image:
    assert image.format == 'PNG' and min(image.size) > 100

  config.divergence.num_images = 2
  assert divergence.run(config, str(tmp_path))['settings']['num_images'] == 2
  # Per-batch statistics of a split that fills one batch: one sample, no Gaussian fit.
  config.divergence.update(dict(num_images=0, pooling='batch'))
  with pytest.raises(ValueError, match='at least 2 samples .* got 1'):
    divergence.run(config, str(tmp_path))


def test_run_without_checkpoint_names_the_workdir(tiny_experiment_config, synthetic_data_dir,
                                                  tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    divergence.run(tiny_experiment_config(synthetic_data_dir), str(tmp_path))


@pytest.mark.parametrize('field', ['pairing', 'pooling'])
def test_bad_divergence_config_is_named(tiny_experiment_config, synthetic_data_dir, tmp_path,
                                        field):
  config = tiny_experiment_config(synthetic_data_dir)
  config.divergence[field] = 'mean'
  with pytest.raises(ValueError, match=f'config.divergence.{field}'):
    divergence.run(config, str(tmp_path))


def test_table1_decay_row_with_the_papers_rgb_numbers(scripts):
  table_script = scripts('cross_modality_table')
  table = {'rgb': {'rgb': 0.4605, 'nir': 0.1829}, 'nir': {'rgb': 0.30, 'nir': 0.40}}
  points, relative = table_script.decay(table, 'rgb')
  np.testing.assert_allclose([points, relative], [27.76, 100 * 27.76 / 46.05])
  np.testing.assert_allclose(table_script.decay(table, 'nir'), [10.0, 25.0])
  lines = table_script.format_table(table, 'val').splitlines()
  assert lines[2] == '| tested on RGB | 46.05 | 30.00 |'
  assert lines[3] == '| tested on NIR | 18.29 | 40.00 |'
  assert lines[4] == '| performance decay | 27.76 (60.3%) | 10.00 (25.0%) |'


def test_plot_script_overlays_runs_with_a_legend(scripts, tmp_path):
  plot_script = scripts('plot_divergence')
  layers = [{'index': i, 'name': name, 'divergence': 1.0 / (i + 1)}
            for i, name in enumerate(models.backbone_layer_names('resnet50'))]
  layers[3]['divergence'] = None  # var_floor=0 and a constant channel: not plotted
  for run_name in ('r50', 'ibn50_s'):
    (tmp_path / run_name).mkdir()
    with open(tmp_path / run_name / 'divergence.json', 'w') as f:
      json.dump({'settings': {'arch': 'resnet50', 'ibn_mode': 'none'}, 'layers': layers}, f)
  out = tmp_path / 'both.png'
  plot_script.main([str(tmp_path / 'r50'), str(tmp_path / 'ibn50_s' / 'divergence.json'),
                    '--labels=ResNet-50,IBN-Net50-s', f'--out={out}'])
  with Image.open(out) as image:
    assert image.format == 'PNG'
  values = [layer['divergence'] for layer in layers]
  mean = np.mean([value for value in values if value is not None])
  assert plot_script.describe(values) == (f'17 layers (1 null), mean divergence {mean:.4f}, '
                                          'last layer 0.0588')
  with pytest.raises(FileNotFoundError, match='divergence.json'):
    plot_script.main([str(tmp_path), f'--out={out}'])
