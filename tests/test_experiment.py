"""experiment.py: multi-process detection, batch sharding, the train state and its abstract twin."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from agrivision_jax import experiment
from agrivision_jax import optim


@pytest.mark.parametrize('environ, expected', [
    ({}, None),
    ({'SLURM_NTASKS': '1', 'OMPI_COMM_WORLD_SIZE': '1', 'JAX_NUM_PROCESSES': '1'}, None),
    ({'SLURM_NTASKS': '4'}, 'SLURM_NTASKS=4'),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, 'OMPI_COMM_WORLD_SIZE=2'),
    ({'JAX_NUM_PROCESSES': '2'}, 'JAX_NUM_PROCESSES=2'),
    ({'TPU_WORKER_HOSTNAMES': 'localhost'}, None),
    ({'TPU_WORKER_HOSTNAMES': 't1v-0,t1v-1'}, 'TPU_WORKER_HOSTNAMES=t1v-0,t1v-1'),
])
def test_multiprocess_environment(environ, expected):
  assert experiment.multiprocess_environment(environ) == expected


def test_multiprocess_environment_without_distributed_is_refused(tiny_config):
  config = tiny_config()
  with pytest.raises(ValueError, match=r'^SLURM_NTASKS=2 says this is one of several processes: '
                                       r'pass --config\.distributed=True'):
    experiment.initialize_distributed(config, {'SLURM_NTASKS': '2'})
  experiment.initialize_distributed(config, {'SLURM_NTASKS': '1'})  # one process: nothing to do
  assert not jax.distributed.is_initialized()


def test_shard_batch_splits_the_batch_over_the_data_axis():
  mesh = experiment.create_mesh()
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(8, 5, 3, 4)).astype(np.float32),
           'labels': rng.integers(0, 2, (8, 5, 3, 7)).astype(np.uint8),
           'valid': rng.integers(0, 2, (8, 5, 3)).astype(bool), 'id': np.arange(8)}
  sharded = experiment.shard_batch(batch, mesh)
  assert set(sharded) == {'image', 'labels', 'valid'}
  for key, value in sharded.items():
    assert value.sharding.spec == P('data') and value.dtype == batch[key].dtype
    np.testing.assert_array_equal(np.asarray(value), batch[key])
    shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
    assert [s.data.shape[0] for s in shards] == [1] * 8
    np.testing.assert_array_equal(np.asarray(shards[3].data), batch[key][3:4])


@pytest.mark.slow
@pytest.mark.parametrize('modality, channels', [('nrgb', 4), ('rgb', 3)])
def test_abstract_train_state_is_the_twin_of_the_real_one(tiny_config, modality, channels):
  config = tiny_config(modality=modality)
  mesh = experiment.create_mesh()
  model = experiment.create_model(config)
  tx = optim.create_optimizer(config.optim)
  state = experiment.create_train_state(config, model, tx, mesh)
  abstract = experiment.abstract_train_state(config, model, tx, mesh)
  real_leaves, real_tree = jax.tree.flatten(state)
  abstract_leaves, abstract_tree = jax.tree.flatten(abstract)
  assert real_tree == abstract_tree
  for real, twin in zip(real_leaves, abstract_leaves):
    assert (real.shape, real.dtype) == (twin.shape, twin.dtype)
    assert real.sharding.is_equivalent_to(twin.sharding, real.ndim) and real.sharding.spec == P()
  assert int(state.step) == 0
  assert state.params['backbone']['conv1']['kernel'].shape == (7, 7, channels, 8)
  # The SGD momentum buffer starts at zero for every parameter.
  trace = optax.tree_utils.tree_get(state.opt_state, 'trace')
  assert jax.tree.structure(trace) == jax.tree.structure(state.params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(trace))


def test_agreed_on_one_process_is_the_value():
  assert experiment.agreed(7) == 7 and experiment.agreed(0) == 0


def test_setup_inference_checks_the_batch_against_the_devices(tiny_config):
  config = tiny_config()
  with pytest.raises(ValueError, match=r'^config\.predict\.batch_size=12 must be divisible by the '
                                       r'number of devices \(8\)$'):
    experiment.setup_inference(config, 12, 'config.predict.batch_size')
  mesh, model = experiment.setup_inference(config, 16, 'config.predict.batch_size')
  assert mesh.shape == {'data': 8} and model.width == 8
