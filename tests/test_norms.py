"""Norm layers vs PyTorch references: outputs and running statistics, train and eval."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
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
