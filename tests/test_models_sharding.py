"""A jitted train-mode forward with the batch sharded over 8 CPU devices equals one device:
BatchNorm / SwitchableNorm statistics are over the global batch (no axis_name needed), and the
dropout masks do not depend on the sharding.

Run in float64: in float32 the two reduction orders already differ by ~4e-5 of the logits'
scale after ~60 train-mode norms (the float32 noise floor, see torch_reference.check_parity),
which would hide nothing but make the comparison fragile; float64 makes it exact.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import torch_reference as ref
from agrivision_jax import models

CONFIG = dict(arch='resnet50', ibn_mode='s', output_stride=16, multi_grid=(1, 2, 4),
              in_channels=4, num_classes=7, num_low_level_features=3, dtype='float32', width=8,
              aspp_channels=16, decoder_channels=16, low_level_channels=8)


def test_sharded_forward_equals_single_device():
  assert jax.device_count() == 8
  model = models.create_model(CONFIG)
  images = np.random.default_rng(0).standard_normal((8, 40, 56, 4))
  torch_model = ref.randomize_(ref.DeepLab(
      'resnet50', 's', 16, (1, 2, 4), 4, 7, 3, width=8, aspp_channels=16, decoder_channels=16,
      low_level_channels=8), seed=1)
  variables = ref.flax_variables(torch_model, model, images.astype(np.float32), train=False)
  with jax.enable_x64(True):
    _compare(model.clone(dtype=jnp.float64), jax.tree.map(np.float64, variables), images)


def _compare(model, variables, images):
  """Jitted train forward on one device vs on 8 (batch sharded, variables replicated)."""

  @jax.jit
  def forward(variables, images, key):
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': key})
    return logits, updates['batch_stats']

  key = jax.random.key(3)
  single = jax.devices()[0]
  logits_1, stats_1 = forward(jax.device_put(variables, single),
                              jax.device_put(images, single), key)

  mesh = jax.make_mesh((8,), ('data',))
  sharded_images = jax.device_put(images, NamedSharding(mesh, P('data')))
  replicated = jax.device_put(variables, NamedSharding(mesh, P()))
  logits_8, stats_8 = forward(replicated, sharded_images, key)

  # Dropout is active in train mode: another key gives other logits.
  logits_other = forward(jax.device_put(variables, single), jax.device_put(images, single),
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
