"""Test-session set-up and the fixtures several test modules share.

Set-up: 8 virtual CPU devices, float32 matmuls, absl flags parsed, and one persistent compilation
cache for the session (shared by the xdist workers): the tiny models below are compiled again
whenever a new jit closure is traced (each test's own jitted functions, each training
subprocess), and the cache turns those recompilations into disk reads.

Shared fixtures: the tiny configs (``tiny_config``, ``tiny_model_config``,
``tiny_experiment_config``), the synthetic data folder (``synthetic_data_dir``), random weights of
a model's shapes (``random_variables``), the width-4 IBN-Net20-s and its checkpoint
(``tiny_model``, ``tiny_workdir``), and ``scripts`` for importing scripts/<name>.py.
"""

import functools
import importlib
import importlib.metadata
import os
import pathlib
import sys

# XLA:CPU's quick compile (no LLVM optimisation, no fusion emitters) for this process and the
# training subprocesses the tests start, which inherit the environment: the tests compile many
# tiny models, where compilation takes 2x longer than at the default level and running them
# costs little either way. Set before jax is imported: XLA reads XLA_FLAGS once, and aborts on a
# flag it does not know, so only on the jaxlib release these were measured on (pyproject's pin).
QUICK_COMPILE_FLAGS = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')
if importlib.metadata.version('jaxlib').startswith('0.10.'):
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''),
                                      *QUICK_COMPILE_FLAGS]).strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags

# Must run before the JAX backend starts: multi-device tests shard over 8 CPU devices.
jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_default_matmul_precision', 'highest')
# grain worker processes and absl-logging code expect parsed flags.
flags.FLAGS.mark_as_parsed()

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The synthetic dataset every module that trains or predicts shares: 32 px tiles, 24 / 6 / 3.
SYNTHETIC = dict(num_train=24, num_val=6, num_test=3, size=32, seed=0)


# The modules that take longest, longest first (the sum of their tests' durations, measured with
# ``--durations=0``): under ``--dist loadfile --no-loadscope-reorder`` (pyproject.toml) each module
# runs whole on one worker and the modules are handed out in collection order, so a long module
# collected last would leave the other worker idle at the end. (xdist's default reorder hands out
# the modules with the most tests first, whatever they cost.)
LONGEST_FIRST = ('test_deeplab', 'test_reliability', 'test_resnet', 'test_train', 'test_convert',
                 'test_multiprocess', 'test_benchmark', 'test_preemption', 'test_conv',
                 'test_gpu_benchmark', 'test_checkpointing', 'test_divergence', 'test_losses',
                 'test_models_sharding', 'test_main', 'test_field', 'test_data_pipeline',
                 'test_predict', 'test_experiment')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Orders the test modules ``LONGEST_FIRST``, then the rest as collected."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this session, shared by the xdist workers."""
  from jax._src import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker has its own basetemp below one session folder.
  cache = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'jax_cache'
  cache.mkdir(exist_ok=True)
  jax.config.update('jax_compilation_cache_dir', str(cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  cc.reset_cache()
  yield str(cache)
  jax.config.update('jax_compilation_cache_dir', None)
  cc.reset_cache()


@pytest.fixture(scope='session')
def scripts():
  """scripts/ on sys.path; ``scripts('benchmark')`` imports scripts/benchmark.py."""
  path = str(ROOT / 'scripts')
  if path not in sys.path:
    sys.path.insert(0, path)
  return importlib.import_module


def _tiny_config(data_dir: str = 'unused', *, ibn_mode: str = 'none', modality: str = 'nrgb',
                 default_loss: str = 'hybrid') -> ml_collections.ConfigDict:
  """ResNet-20 DeepLabV3+ of width 8 with the hybrid loss on the 32x32 synthetic tiles, batch 8.

  Plain BatchNorm by default: InstanceNorm (IBN-a/b/s) over the 2x2 maps of a 32 px input is so
  ill-conditioned that float32 reduction-order noise moves its gradients by several percent,
  which would hide real sharding errors in the equivalence tests. The norms' sharded statistics
  are tested in the models' tests.

  The loss is the mean of per-image hybrid losses (``loss.group_size=1``): each device sorts its
  own image for the Lovasz term. The global-batch loss would have every one of the 8 CPU devices
  sort the whole batch, 30x slower at the tests' XLA optimisation level; its sharded value and
  gradient are tested in test_losses.
  """
  from agrivision_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config(f'depth=20,modality={modality}', ibn_mode=ibn_mode,
                             default_loss=default_loss)
  config.model.update(dict(width=8, aspp_channels=16, decoder_channels=16, low_level_channels=8))
  config.data.update(dict(source='synthetic', data_dir=str(data_dir), image_size=32,
                          batch_size=8, eval_batch_size=8, num_workers=0))
  config.data.synthetic.update(SYNTHETIC)
  config.loss.group_size = 1
  config.optim.update(dict(learning_rate=0.05, warmup_steps=3, constant_steps=40,
                           decay_steps=20))
  config.update(dict(num_train_steps=6, log_every_steps=1, eval_every_steps=100,
                     checkpoint_every_steps=3, max_checkpoints_to_keep=10))
  return config


def _tiny_model_config(arch: str = 'resnet20', in_channels: int = 4,
                       ibn_mode: str = 's') -> dict:
  """A width-4 ResNet-20 DeepLabV3+ model spec: compiles in seconds on 2 CPU cores."""
  return dict(arch=arch, ibn_mode=ibn_mode, output_stride=16, multi_grid=(1, 2, 4),
              in_channels=in_channels, num_classes=7, num_low_level_features=3, dtype='float32',
              width=4, aspp_channels=8, decoder_channels=8, low_level_channels=4)


def _tiny_experiment_config(data_dir: str) -> ml_collections.ConfigDict:
  """The IBN-Net-s row shrunk to ``tiny_model_config`` (ResNet-20) on the 32x32 synthetic tiles
  (6 val, 3 test), with the divergence and predict settings at their defaults and batches of 8."""
  from agrivision_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config('depth=20', ibn_mode='s')
  config.model.update({k: v for k, v in _tiny_model_config().items() if k in config.model})
  config.data.update(dict(source='synthetic', data_dir=str(data_dir), image_size=32,
                          batch_size=8, eval_batch_size=8, num_workers=0))
  config.data.synthetic.update(SYNTHETIC)
  config.predict.update(dict(split='val', tta='none', num_overlays=4, batch_size=8))
  return config


def _random_variables(model, seed: int = 0, size: int = 32) -> dict:
  """Random {'params', 'batch_stats'} of ``model`` with the shapes of its init (jax.eval_shape, no
  compilation): He-normal kernels, norm scales near 1, biases and mixing logits near 0, running
  means near 0 and running variances in [0.5, 1.5]."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, model.in_channels)),
                         train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = np.prod(leaf.shape[:-1])
      return rng.normal(0, np.sqrt(2 / fan_in), leaf.shape).astype(np.float32)
    if name == 'var':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    centre = 1.0 if name == 'scale' else 0.0
    return (centre + rng.normal(0, 0.1, leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _set_field(config: ml_collections.ConfigDict, field: str, value) -> None:
  """Sets the dotted ``field`` of ``config`` ('seed', 'model.width') to ``value`` of any type."""
  group, _, name = field.rpartition('.')
  parent = config
  for part in filter(None, group.split('.')):
    parent = parent[part]
  with parent.ignore_type():
    parent[name] = value


@pytest.fixture(scope='session')
def set_field():
  """``set_field(config, 'model.width', value)``: sets a dotted config field, of any type."""
  return _set_field


@pytest.fixture(scope='session')
def tiny_config():
  """``tiny_config(data_dir, ibn_mode='none', modality='nrgb', default_loss='hybrid')``."""
  return _tiny_config


@pytest.fixture(scope='session')
def tiny_model_config():
  """``tiny_model_config(arch='resnet20', in_channels=4, ibn_mode='s')``: a model spec dict."""
  return _tiny_model_config


@pytest.fixture(scope='session')
def tiny_experiment_config():
  """``tiny_experiment_config(data_dir)``: the width-4 IBN-Net20-s experiment."""
  return _tiny_experiment_config


@pytest.fixture(scope='session')
def random_variables():
  """``random_variables(model, seed=0, size=32)``: random weights of the model's shapes."""
  return _random_variables


@pytest.fixture(scope='session')
def synthetic_data_dir(tmp_path_factory) -> str:
  """The synthetic dataset of ``SYNTHETIC``, generated once per session (per xdist worker)."""
  from agrivision_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp('synthetic') / 'av')
  synthetic.ensure_synthetic(data_dir, **SYNTHETIC)
  return data_dir


@pytest.fixture(scope='session')
def tiny_model():
  """(model, variables, forward): the width-4 IBN-Net20-s with random weights (seed 1) and its
  jitted eval forward ``forward(images) -> logits``."""
  from agrivision_jax import models  # pylint: disable=g-import-not-at-top
  model = models.model_from_spec(_tiny_model_config())
  variables = _random_variables(model, seed=1)
  forward = jax.jit(functools.partial(model.apply, train=False))
  return model, variables, functools.partial(forward, variables)


def save_checkpoint(config: ml_collections.ConfigDict, workdir: str, variables: dict) -> None:
  """Saves ``variables`` as the workdir's step-1 checkpoint, the way training does."""
  # pylint: disable=g-import-not-at-top
  from agrivision_jax import checkpointing
  from agrivision_jax import data as data_lib
  from agrivision_jax import experiment
  from agrivision_jax import optim
  tx = optim.create_optimizer(config.optim)
  state = experiment.TrainState(step=jnp.ones((), jnp.int32), params=variables['params'],
                                batch_stats=variables['batch_stats'],
                                opt_state=tx.init(variables['params']))
  manager = checkpointing.create_manager(workdir, 1)
  checkpointing.save(manager, 1, state, data_lib.create_train_iterator(config.data, 0, 0, 1))
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory, synthetic_data_dir, tiny_model):
  """(config, workdir): ``tiny_experiment_config`` and a workdir whose step-1 checkpoint holds
  ``tiny_model``'s weights. Tests that write into it copy it first or write only outputs."""
  config = _tiny_experiment_config(synthetic_data_dir)
  workdir = str(tmp_path_factory.mktemp('tiny_workdir') / 'workdir')
  save_checkpoint(config, workdir, tiny_model[1])
  return config, workdir
