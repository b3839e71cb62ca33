"""Feature divergence: KL formula, streaming Gaussian fit, layer capture, end-to-end run."""

import numpy as np
import pytest

from agrivision_jax import divergence


def _kl_by_integration(mean_p, var_p, mean_q, var_q):
  """KL(P||Q) = integral of p log(p/q), trapezoid rule on a grid covering both densities."""
  std_p, std_q = np.sqrt(var_p), np.sqrt(var_q)
  low = min(mean_p - 14 * std_p, mean_q - 14 * std_q)
  high = max(mean_p + 14 * std_p, mean_q + 14 * std_q)
  x = np.linspace(low, high, 400_001)
  log_p = -0.5 * ((x - mean_p) / std_p) ** 2 - np.log(std_p * np.sqrt(2 * np.pi))
  log_q = -0.5 * ((x - mean_q) / std_q) ** 2 - np.log(std_q * np.sqrt(2 * np.pi))
  return np.trapezoid(np.exp(log_p) * (log_p - log_q), x)


def test_kl_matches_numerical_integration():
  rng = np.random.default_rng(0)
  for _ in range(6):
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


def test_layer_divergence_is_mean_over_channels_and_counts_constant_channels():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(20, 4))
  b = rng.normal(1.0, 2.0, size=(20, 4))
  a[:, 3] = b[:, 3] = 0.0   # a dead ReLU channel under both inputs
  value, degenerate = divergence.layer_divergence(divergence.ChannelStats.from_samples(a),
                                                  divergence.ChannelStats.from_samples(b), 1e-6)
  var_a, var_b = a.var(axis=0, ddof=1) + 1e-6, b.var(axis=0, ddof=1) + 1e-6
  expected = []
  for c in range(4):
    expected.append(_kl_by_integration(a[:, c].mean(), var_a[c], b[:, c].mean(), var_b[c])
                    + _kl_by_integration(b[:, c].mean(), var_b[c], a[:, c].mean(), var_a[c]))
  np.testing.assert_allclose(value, np.mean(expected), rtol=1e-6)
  assert degenerate == 1
