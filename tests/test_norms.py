"""Norm layers vs PyTorch references: outputs and running statistics, train and eval; SN
statistics groups; the one-reduction batch statistics' accuracy."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

from agrivision_jax.models import norms
import torch_reference as ref


def _images(seed: int, shape=(2, 9, 11, 6), offset: float = 0.5, scale: float = 2.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale + offset).astype(np.float32)


def _train_step(flax_module, variables, x):
  """One train-mode forward: (output, variables with the updated batch_stats)."""
  y, updates = flax_module.apply(variables, x, train=True, mutable=['batch_stats'])
  return y, {**variables, **updates}


def _compare_stats(variables, torch_module, prefix: str = ''):
  sd = ref.numpy_state_dict(torch_module)
  stats = variables['batch_stats']
  for part in filter(None, prefix.split('/')):
    stats = stats[part]
  torch_prefix = prefix.replace('/', '.')
  ref.assert_close(stats['mean'], sd[torch_prefix + 'running_mean'].reshape(-1), what='mean')
  ref.assert_close(stats['var'], sd[torch_prefix + 'running_var'].reshape(-1), what='var')


@pytest.mark.parametrize('using_moving_average,using_bn',
                         [(True, True), (False, True), (True, False)])
def test_switchable_norm_train_eval_and_running_stats(using_moving_average, using_bn):
  torch_sn = ref.randomize_(ref.SwitchNorm2d(6, using_moving_average=using_moving_average,
                                             using_bn=using_bn), seed=1)
  flax_sn = norms.SwitchableNorm(using_moving_average=using_moving_average, using_bn=using_bn)
  x1, x2, x3 = _images(2), _images(3, offset=-0.2), _images(4, scale=0.7)
  variables = ref.flax_variables(torch_sn, flax_sn, x1, train=False)
  if using_bn:  # fresh running statistics start at zero
    init = jax.eval_shape(lambda x: flax_sn.init(jax.random.key(0), x, train=False), x1)
    fresh = flax_sn.init(jax.random.key(0), x1, train=False)['batch_stats']
    assert init['batch_stats']['mean'].shape == (6,)
    np.testing.assert_array_equal(fresh['mean'], 0.0)
    np.testing.assert_array_equal(fresh['var'], 0.0)

  torch_sn.train()
  for x in (x1, x2):  # two steps: the running update compounds
    y, variables = _train_step(flax_sn, variables, x)
    ref.assert_close(y, ref.to_nhwc(torch_sn(ref.to_nchw(x))), what='train output')
  if using_bn:
    _compare_stats(variables, torch_sn)
  else:
    assert 'batch_stats' not in variables or not variables['batch_stats']

  torch_sn.eval()
  ref.assert_close(flax_sn.apply(variables, x3, train=False),
                   ref.to_nhwc(torch_sn(ref.to_nchw(x3))), what='eval output')


def test_switchable_norm_defaults_match_reference():
  flax_sn = norms.SwitchableNorm()
  assert (flax_sn.momentum, flax_sn.epsilon) == (0.9, 1e-5)
  x = _images(5)
  params = flax_sn.init(jax.random.key(0), x, train=False)['params']
  for name in ('scale', 'mean_weight', 'var_weight'):
    np.testing.assert_array_equal(params[name], 1.0)
  np.testing.assert_array_equal(params['bias'], 0.0)


def test_batch_norm_train_eval_and_unbiased_running_var():
  # 2*3*5 = 30 values per channel: the unbiased factor 30/29 is far above the tolerance.
  torch_bn = ref.randomize_(nn.BatchNorm2d(4), seed=6)
  flax_bn = norms.BatchNorm()
  x1, x2 = _images(7, (2, 3, 5, 4)), _images(8, (2, 3, 5, 4), offset=1.0)
  variables = ref.flax_variables(torch_bn, flax_bn, x1, train=False)
  torch_bn.train()
  y, variables = _train_step(flax_bn, variables, x1)
  ref.assert_close(y, ref.to_nhwc(torch_bn(ref.to_nchw(x1))), what='train output')
  _compare_stats(variables, torch_bn)
  torch_bn.eval()
  ref.assert_close(flax_bn.apply(variables, x2, train=False),
                   ref.to_nhwc(torch_bn(ref.to_nchw(x2))), what='eval output')


def test_instance_norm():
  torch_in = ref.randomize_(nn.InstanceNorm2d(5, affine=True), seed=9)
  flax_in = norms.InstanceNorm()
  x = _images(10, (3, 7, 4, 5), offset=3.0)
  variables = ref.flax_variables(torch_in, flax_in, x)
  ref.assert_close(flax_in.apply(variables, x), ref.to_nhwc(torch_in(ref.to_nchw(x))))


@pytest.mark.parametrize('channels', [7, 8])
def test_ibn_train_eval_and_running_stats(channels):
  torch_ibn = ref.randomize_(ref.IBN(channels), seed=11)
  flax_ibn = norms.IBN()
  x1, x2 = _images(12, (2, 5, 6, channels)), _images(13, (2, 5, 6, channels), offset=-1.0)
  variables = ref.flax_variables(torch_ibn, flax_ibn, x1, train=False)
  assert variables['params']['IN']['scale'].shape == (channels // 2,)
  assert variables['params']['BN']['scale'].shape == (channels - channels // 2,)
  torch_ibn.train()
  y, variables = _train_step(flax_ibn, variables, x1)
  ref.assert_close(y, ref.to_nhwc(torch_ibn(ref.to_nchw(x1))), what='train output')
  _compare_stats(variables, torch_ibn, prefix='BN/')
  torch_ibn.eval()
  ref.assert_close(flax_ibn.apply(variables, x2, train=False),
                   ref.to_nhwc(torch_ibn(ref.to_nchw(x2))), what='eval output')


@pytest.mark.parametrize('layer', [norms.BatchNorm, norms.SwitchableNorm, norms.IBN,
                                   norms.InstanceNorm])
def test_bfloat16_output_with_float32_statistics(layer):
  # A large offset: statistics reduced in bfloat16 would be off by far more than the output's
  # own bfloat16 rounding.
  x = jnp.asarray(_images(14, (2, 6, 5, 6), offset=100.0, scale=1.0), jnp.bfloat16)
  module_16, module_32 = layer(dtype=jnp.bfloat16), layer(dtype=jnp.float32)
  variables = module_32.init(jax.random.key(0), x.astype(jnp.float32), train=False)
  y16, _ = module_16.apply(variables, x, train=True, mutable=['batch_stats'])
  y32, _ = module_32.apply(variables, x.astype(jnp.float32), train=True, mutable=['batch_stats'])
  assert y16.dtype == jnp.bfloat16
  ref.assert_close(y16, y32, rel=1e-2)


def test_torch_reference_sn_matches_formula():
  """The reference SN itself against a direct numpy evaluation of the published formula."""
  torch_sn = ref.randomize_(ref.SwitchNorm2d(3), seed=15).train()
  x = _images(16, (2, 3, 4, 3))
  y = ref.to_nhwc(torch_sn(ref.to_nchw(x)))
  sd = ref.numpy_state_dict(torch_sn)
  w_mean = np.exp(sd['mean_weight']) / np.exp(sd['mean_weight']).sum()
  w_var = np.exp(sd['var_weight']) / np.exp(sd['var_weight']).sum()
  xd = x.astype(np.float64)
  mean_in = xd.mean((1, 2), keepdims=True)
  var_in = xd.var((1, 2), keepdims=True, ddof=1)
  mean_ln = mean_in.mean(3, keepdims=True)
  var_ln = (var_in + mean_in ** 2).mean(3, keepdims=True) - mean_ln ** 2
  mean_bn = mean_in.mean(0, keepdims=True)
  var_bn = (var_in + mean_in ** 2).mean(0, keepdims=True) - mean_bn ** 2
  mean = w_mean[0] * mean_in + w_mean[1] * mean_ln + w_mean[2] * mean_bn
  var = w_var[0] * var_in + w_var[1] * var_ln + w_var[2] * var_bn
  expected = (xd - mean) / np.sqrt(var + 1e-5) * sd['weight'].reshape(-1) + sd['bias'].reshape(-1)
  ref.assert_close(y, expected)


@pytest.mark.parametrize('using_moving_average', [True, False])
def test_switchable_norm_statistics_groups_equal_one_reference_per_group(using_moving_average):
  """group_size=2 on 6 images = three reference SwitchNorm2d copies, one per group of 2 (the
  authors' unsynchronised DDP ranks); the running statistics follow the first group (rank 0's
  buffers, which DDP broadcasts to every rank at each forward)."""
  group, shape = 2, (6, 5, 7, 6)
  torch_sn = ref.randomize_(ref.SwitchNorm2d(6, using_moving_average=using_moving_average),
                            seed=21)
  ranks = [copy.deepcopy(torch_sn).train() for _ in range(shape[0] // group)]
  flax_sn = norms.SwitchableNorm(group_size=group, using_moving_average=using_moving_average)
  x1, x2, x3 = _images(22, shape), _images(23, shape, offset=-0.4), _images(24, shape, scale=0.6)
  variables = ref.flax_variables(torch_sn, flax_sn, x1, train=False)
  global_sn = norms.SwitchableNorm(using_moving_average=using_moving_average)
  y_global, _ = global_sn.apply(variables, x1, train=True, mutable=['batch_stats'])
  for x in (x1, x2):
    y, variables = _train_step(flax_sn, variables, x)
    with torch.no_grad():
      for rank in ranks[1:]:  # broadcast_buffers: rank 0's running statistics win
        rank.running_mean.copy_(ranks[0].running_mean)
        rank.running_var.copy_(ranks[0].running_var)
    expected = np.concatenate([ref.to_nhwc(rank(ref.to_nchw(x[i * group:(i + 1) * group])))
                               for i, rank in enumerate(ranks)])
    ref.assert_close(y, expected, what='train output')
    if x is x1:  # the groups' statistics differ from the whole batch's
      assert np.abs(np.asarray(y_global) - expected).max() > 1e-2 * np.abs(expected).max()
  _compare_stats(variables, ranks[0])
  ranks[0].eval()
  ref.assert_close(flax_sn.apply(variables, x3, train=False),
                   ref.to_nhwc(ranks[0](ref.to_nchw(x3))), what='eval output')


def test_switchable_norm_groups_must_divide_the_batch():
  flax_sn = norms.SwitchableNorm(group_size=4)
  x = _images(25, (6, 3, 4, 2))
  variables = flax_sn.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match='config.model.sn_group_size'):
    flax_sn.apply(variables, x, train=True, mutable=['batch_stats'])


@pytest.mark.parametrize('layer', [norms.BatchNorm, norms.SwitchableNorm])
def test_batch_statistics_accurate_far_from_zero(layer):
  """float32 inputs with mean 1000 and spread ~1, running mean near the batch mean (the shift):
  the one-reduction variance equals a float64 evaluation of the definition. Unshifted, the
  float32 E[x^2] - E[x]^2 would be off by about 1e-7 * 1000^2 = 0.1 of the variance."""
  channels = 5
  x = _images(26, (4, 6, 7, channels), offset=1000.0, scale=1.0)
  module = layer()
  variables = module.init(jax.random.key(0), x, train=False)
  stats = dict(variables['batch_stats'])
  stats['mean'] = jnp.asarray(x.mean((0, 1, 2)) + np.linspace(-0.5, 0.5, channels), jnp.float32)
  variables = {**variables, 'batch_stats': stats}
  y, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
  xd = x.astype(np.float64)
  if layer is norms.BatchNorm:
    count = x.size // channels
    mean, var = xd.mean((0, 1, 2)), xd.var((0, 1, 2))
    expected = (xd - mean) / np.sqrt(var + 1e-5)
    expected_var = 0.9 * 1.0 + 0.1 * var * count / (count - 1)
  else:  # mean_weight = var_weight = ones: each term weighs 1/3
    mean_in, var_in = xd.mean((1, 2), keepdims=True), xd.var((1, 2), keepdims=True, ddof=1)
    mean_ln = mean_in.mean(3, keepdims=True)
    var_ln = (var_in + mean_in ** 2).mean(3, keepdims=True) - mean_ln ** 2
    mean_bn = mean_in.mean(0, keepdims=True)
    var_bn = var_in.mean(0, keepdims=True) + mean_in.var(0, keepdims=True)
    expected = (xd - (mean_in + mean_ln + mean_bn) / 3) / np.sqrt(
        (var_in + var_ln + var_bn) / 3 + 1e-5)
    expected_var = 0.1 * var_bn.reshape(-1)
  # The output x * a + b itself rounds x ~ 1000 in float32 (~6e-5): 1e-4 of its scale.
  ref.assert_close(y, expected, rel=1e-4, what='train output')
  # SN's variance also holds the spread of the instance means, each ~1000 summed in float32.
  rel = 1e-5 if layer is norms.BatchNorm else 1e-4
  ref.assert_close(updates['batch_stats']['var'], expected_var, rel=rel, what='running var')
