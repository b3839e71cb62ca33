"""A jitted train-mode forward with the batch sharded over 8 CPU devices equals one device, under
both conv implementations: BatchNorm / SwitchableNorm statistics are over the global batch (no
axis_name needed), each norm layer costs at most one all-reduce, and the dropout masks do not
depend on the sharding. SwitchableNorm statistics groups inside a device's shard need no
communication for the normalisation.

Run in float64: in float32 the two reduction orders already differ by ~4e-5 of the logits'
scale after ~60 train-mode norms (the float32 noise floor, see torch_reference.check_parity),
which would hide nothing but make the comparison fragile; float64 makes it exact.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import torch_reference as ref
from agrivision_jax import models
from agrivision_jax.models import norms

CONFIG = dict(arch='resnet20', ibn_mode='s', output_stride=16, multi_grid=(1, 2, 4),
              num_low_level_features=3, dtype='float32', width=8, aspp_channels=16,
              decoder_channels=16, low_level_channels=8, sn_group_size=0)


def _all_reduces(compiled_text: str) -> int:
  """Number of all-reduce instructions (a combined tuple all-reduce counts once)."""
  return len(re.findall(r'= \S+ all-reduce(?:-start)?\(', compiled_text))


@pytest.mark.slow
@pytest.mark.parametrize('conv_impl', ['xla', 'cpu_gemm'])
def test_sharded_forward_equals_single_device(conv_impl):
  assert jax.device_count() == 8
  model = models.create_model(dict(CONFIG, conv_impl=conv_impl), in_channels=4, num_classes=7)
  images = np.random.default_rng(0).standard_normal((8, 40, 56, 4))
  torch_model = ref.randomize_(ref.DeepLab(
      'resnet20', 's', 16, (1, 2, 4), 4, 7, 3, width=8, aspp_channels=16, decoder_channels=16,
      low_level_channels=8), seed=1)
  variables = ref.flax_variables(torch_model, model, images.astype(np.float32), train=False)
  with jax.enable_x64(True):
    compiled_text = _compare(model.clone(dtype=jnp.float64), jax.tree.map(np.float64, variables),
                             images)
  # One all-reduce per norm layer with cross-batch statistics at most (BN and SN; IN needs none):
  # mean and mean of squares are reduced together.
  layers_with_batch_stats = {path[:-1] for path, _ in
                             jax.tree_util.tree_leaves_with_path(variables['batch_stats'])}
  torch_norms_with_stats = [m for m in torch_model.modules()
                           if getattr(m, 'running_mean', None) is not None]
  assert len(layers_with_batch_stats) == len(torch_norms_with_stats) > 20
  assert 0 < _all_reduces(compiled_text) <= len(layers_with_batch_stats)


def _compare(model, variables, images) -> str:
  """Jitted train forward on one device vs on 8 (batch sharded, variables replicated); returns
  the compiled 8-device forward's HLO text."""

  def forward(variables, images, key):
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': key})
    return logits, updates['batch_stats']

  key = jax.random.key(3)
  single = jax.devices()[0]
  forward_1 = jax.jit(forward)
  logits_1, stats_1 = forward_1(jax.device_put(variables, single),
                                jax.device_put(images, single), key)

  mesh = jax.make_mesh((8,), ('data',), axis_types=(AxisType.Auto,))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P('data')))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  forward_8 = jax.jit(forward).lower(replicated, sharded_images, key).compile()
  logits_8, stats_8 = forward_8(replicated, sharded_images, key)

  # Dropout is active in train mode: another key gives other logits.
  logits_other = forward_1(jax.device_put(variables, single), jax.device_put(images, single),
                           jax.random.key(4))[0]
  assert np.abs(logits_other - logits_1).max() > 1e-3 * np.abs(logits_1).max()

  assert len(logits_8.sharding.device_set) == 8
  assert logits_8.dtype == jnp.float64
  ref.assert_close(logits_8, logits_1, rel=1e-9, what='logits')
  flat_1 = jax.tree_util.tree_leaves_with_path(stats_1)
  flat_8 = dict(jax.tree_util.tree_leaves_with_path(stats_8))
  assert len(flat_1) == len(flat_8)
  for path, value in flat_1:
    ref.assert_close(flat_8[path], value, rel=1e-9, what=jax.tree_util.keystr(path))
  return forward_8.as_text()


def _switchable_norm_on_8_devices(group_size: int, axis_type: AxisType):
  """(layer, forward, (variables, x) on one device, (variables, x) on 8): a SwitchableNorm over
  16 images (5x7, 6 channels); ``forward(variables, x) -> (y, batch_stats)`` in train mode; on
  8 devices x is batch-sharded and the variables replicated."""
  layer = norms.SwitchableNorm(group_size=group_size)
  x = np.random.default_rng(5).standard_normal((16, 5, 7, 6)).astype(np.float32) + 0.3
  variables = layer.init(jax.random.key(0), x, train=False)

  def forward(variables, x):
    y, updates = layer.apply(variables, x, train=True, mutable=['batch_stats'])
    return y, updates['batch_stats']

  mesh = jax.make_mesh((8,), ('data',), axis_types=(axis_type,))
  sharded = (jax.device_put(variables, NamedSharding(mesh, P())),
             jax.device_put(x, NamedSharding(mesh, P('data'))))
  return layer, forward, (variables, x), sharded


@pytest.mark.parametrize('axis_type', [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize('group_size', [2, 8, 0])
def test_switchable_norm_groups_sharded_equal_one_device(group_size, axis_type):
  """16 images on 8 devices, SN statistics over groups of 2 (inside a device's shard), 8 (over
  4 devices) or all 16 (global): the sharded result equals one device's, under Auto and Explicit
  mesh axes."""
  _, forward, one_device, eight_devices = _switchable_norm_on_8_devices(group_size, axis_type)
  y_8, stats_8 = jax.jit(forward)(*eight_devices)
  y_1, stats_1 = jax.jit(forward)(*one_device)
  ref.assert_close(y_8, y_1, rel=1e-5, what='output')
  for name in ('mean', 'var'):
    ref.assert_close(stats_8[name], stats_1[name], rel=1e-5, what=name)


@pytest.mark.parametrize('group_size, max_all_reduces', [(2, 1), (0, 1)])
def test_switchable_norm_groups_inside_a_shard_need_no_communication(group_size, max_all_reduces):
  """16 images on 8 devices (Auto axes, as the train step): groups of 2 lie inside a device's
  shard, so the normalisation needs no all-reduce; the one left broadcasts the first group's
  statistics into the replicated running statistics."""
  layer, forward, _, (replicated, sharded) = _switchable_norm_on_8_devices(group_size,
                                                                          AxisType.Auto)
  mesh = sharded.sharding.mesh
  compiled = jax.jit(forward, out_shardings=(NamedSharding(mesh, P('data')),
                                             NamedSharding(mesh, P()))).lower(
                                                 replicated, sharded).compile()
  assert _all_reduces(compiled.as_text()) <= max_all_reduces
  if group_size:  # without the running-statistics update there is no collective at all
    output_only = jax.jit(lambda v, x: layer.apply(v, x, train=True, mutable=['batch_stats'])[0],
                          out_shardings=NamedSharding(mesh, P('data')))
    text = output_only.lower(replicated, sharded).compile().as_text()
    assert _all_reduces(text) == 0 and 'all-gather' not in text, text
