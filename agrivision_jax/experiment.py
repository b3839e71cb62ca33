"""What every mode shares: distributed start, the device mesh, batch sharding, the model, the
train state and restoring it.

The global batch is split over a 1-D mesh of every device (axis 'data'); parameters, norm
statistics and optimizer state are replicated, so BatchNorm / SwitchableNorm statistics are over
the global batch (SyncBN semantics). Each process loads its own share of every batch and the
global arrays are assembled with ``jax.make_array_from_process_local_data``; the same code runs on
one CPU, one GPU or a multi-host pod. On several processes, process 0 decides (which checkpoint
to restore, what to log) and every process follows.
"""

import os
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from agrivision_jax import checkpointing
from agrivision_jax import configuration
from agrivision_jax import models
from agrivision_jax import optim

BATCH_KEYS = ('image', 'labels', 'valid')

# Environment variables that say this process is one of several (name -> what sets it).
_MULTIPROCESS_ENV = {
    'JAX_NUM_PROCESSES': 'JAX', 'SLURM_NTASKS': 'SLURM', 'OMPI_COMM_WORLD_SIZE': 'Open MPI',
    'PMI_SIZE': 'MPI', 'WORLD_SIZE': 'torchrun / Kubernetes',
}


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes; saved whole in every checkpoint.

  Attributes:
    step: int32 scalar, the number of updates applied (indexes the lr schedule and dropout rng).
    params: the model's 'params' collection.
    batch_stats: the model's 'batch_stats' collection (BN / SN running statistics).
    opt_state: the optax state (momentum buffer and update count).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def multiprocess_environment(environ: Mapping[str, str] | None = None) -> str | None:
  """Names the variable that says this process is one of several ('SLURM_NTASKS=2'), else None.

  Args:
    environ: the environment (default ``os.environ``).
  """
  environ = os.environ if environ is None else environ
  for name in _MULTIPROCESS_ENV:
    value = environ.get(name, '')
    if value.isdigit() and int(value) > 1:
      return f'{name}={value}'
  hosts = environ.get('TPU_WORKER_HOSTNAMES', '')
  if ',' in hosts:
    return f'TPU_WORKER_HOSTNAMES={hosts}'
  return None


def initialize_distributed(config: ml_collections.ConfigDict,
                           environ: Mapping[str, str] | None = None) -> None:
  """Starts multi-host JAX when ``config.distributed``; refuses a multi-process run without it.

  Must run before anything touches a device. The coordinator address, process count and id come
  from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when set, else from
  the cluster (TPU pod, SLURM, Open MPI, Kubernetes). CPU collectives use gloo.

  Raises:
    ValueError: the environment says several processes (``multiprocess_environment``) but
      ``config.distributed`` is False: each would otherwise train alone on the same workdir.
  """
  environ = os.environ if environ is None else environ
  if not config.get('distributed', False):
    found = multiprocess_environment(environ)
    if found:
      raise ValueError(f'{found} says this is one of several processes: pass '
                       '--config.distributed=True (or run a single process)')
    return
  if jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  count, index = environ.get('JAX_NUM_PROCESSES'), environ.get('JAX_PROCESS_ID')
  jax.distributed.initialize(
      coordinator_address=environ.get('JAX_COORDINATOR_ADDRESS'),
      num_processes=int(count) if count else None,
      process_id=int(index) if index else None)


def create_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The sharding of parameters, statistics and optimizer state: a full copy on every device."""
  return NamedSharding(mesh, P())


def shard_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Assembles this process's share of a batch into global arrays split over the 'data' axis.

  Args:
    batch: per-process arrays image (b,H,W,Cin) float32, labels (b,H,W,C) uint8,
      valid (b,H,W) bool (other keys, such as 'id', are dropped).
    mesh: from ``create_mesh``.

  Returns:
    The same keys as global arrays of batch b * process_count, sharded as P('data').
  """
  sharding = NamedSharding(mesh, P('data'))
  return {key: jax.make_array_from_process_local_data(sharding, np.asarray(batch[key]))
          for key in BATCH_KEYS}


def agreed(value: int) -> int:
  """Process 0's ``value`` on every process (the value itself on one process)."""
  if jax.process_count() == 1:
    return int(value)
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def create_model(config: ml_collections.ConfigDict) -> flax.linen.Module:
  """``models.create_model`` of ``config.model`` for the channels and classes of ``config.data``."""
  return models.create_model(config.model, in_channels=configuration.in_channels(config),
                             num_classes=configuration.num_classes(config))


def setup(config: ml_collections.ConfigDict, training: bool = True) -> jax.sharding.Mesh:
  """Starts multi-host JAX if asked, validates ``config``, logs the conv kernels; the mesh.

  ``training``: the run trains (``configuration.validate``'s ``training``).

  Raises:
    ValueError: a bad config field, named; a multi-process environment without
      ``config.distributed``.
  """
  initialize_distributed(config)
  configuration.validate(config, jax.device_count(), jax.process_count(), training=training)
  logging.info('%d process(es), %d %s device(s); conv_impl %s -> %s', jax.process_count(),
               jax.device_count(), jax.default_backend(), config.model.conv_impl,
               models.resolve_conv_impl(config.model.conv_impl))
  return create_mesh()


def resolved(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What ``config`` leaves to the machine, as chosen here (recorded beside it in config.json)."""
  return {'conv_impl': models.resolve_conv_impl(config.model.conv_impl),
          'in_channels': configuration.in_channels(config),
          'num_classes': configuration.num_classes(config),
          'backend': jax.default_backend(), 'device_count': jax.device_count(),
          'process_count': jax.process_count(), 'jax_version': jax.__version__}


def setup_inference(config: ml_collections.ConfigDict, batch_size: int,
                    batch_field: str) -> tuple[jax.sharding.Mesh, flax.linen.Module]:
  """The shared start of the inference modes (divergence, predict).

  Args:
    config: the full config.
    batch_size: the mode's global batch size.
    batch_field: its config field, named in the error (e.g. 'config.predict.batch_size').

  Returns:
    (mesh from ``create_mesh``, ``create_model(config)``).

  Raises:
    ValueError: a bad config field, named; ``batch_size`` not divisible by the device count.
  """
  mesh = setup(config, training=False)
  if batch_size % jax.device_count():
    raise ValueError(f'{batch_field}={batch_size} must be divisible by the number of devices '
                     f'({jax.device_count()})')
  return mesh, create_model(config)


def _image_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int, int]:
  size = config.data.image_size
  return (1, size, size, configuration.in_channels(config))


def initial_variables(config: ml_collections.ConfigDict, model: flax.linen.Module) -> dict:
  """Fresh {'params', 'batch_stats'} (host arrays) with ``config.init_from``'s leaves copied in.

  The converted directory (``agrivision_jax.convert``) may hold every variable (a full
  checkpoint) or the backbone only (ImageNet weights); the rest stays freshly initialised.
  """
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  variables = jax.device_get(models.init_variables(model, key, _image_shape(config)))
  if config.init_from:
    from agrivision_jax import convert  # pylint: disable=g-import-not-at-top (optional, heavy)
    loaded = convert.load_variables(config.init_from, config.model)
    variables = checkpointing.merge_variables(variables, loaded,
                                              f'config.init_from={config.init_from}')
  return variables


def _train_state_fn(tx: optax.GradientTransformation) -> Callable[[Mapping[str, Any]], TrainState]:
  """The one function from variables to a step-0 TrainState (abstract twin and real init)."""

  def state(variables: Mapping[str, Any]) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(variables['params']))
  return state


def create_train_state(config: ml_collections.ConfigDict, model: flax.linen.Module,
                       tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
  """Initialises the model (``initial_variables``) and the optimizer, replicated over ``mesh``.

  Args:
    config: the experiment config (seed, model, data.image_size, init_from).
    model: ``create_model(config)``.
    tx: ``optim.create_optimizer(config.optim)``.
    mesh: from ``create_mesh``.

  Returns:
    A TrainState at step 0 with every leaf replicated over ``mesh``.
  """
  variables = checkpointing.place_replicated(initial_variables(config, model), mesh)
  return jax.jit(_train_state_fn(tx), out_shardings=replicated(mesh))(variables)


def abstract_train_state(config: ml_collections.ConfigDict, model: flax.linen.Module,
                         tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
  """``create_train_state``'s structure: replicated ShapeDtypeStructs (nothing computed)."""
  image_shape = _image_shape(config)
  variables = jax.eval_shape(lambda: models.init_variables(model, jax.random.key(0), image_shape))
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                      jax.eval_shape(_train_state_fn(tx), variables))


def restore_variables_and_step(config: ml_collections.ConfigDict, workdir: str,
                               mesh: jax.sharding.Mesh | None = None) -> tuple[dict, int]:
  """Loads {'params', 'batch_stats'} of ``config.restore`` ('latest' | 'best' | a step).

  Falls back to ``config.init_from`` (step 0) when ``config.restore`` is 'latest' and the workdir
  has no checkpoint.

  Args:
    config: the experiment config (its model must match the checkpoint).
    workdir: a training run's directory (local path or URL such as gs://...).
    mesh: where to put the (replicated) variables; default ``create_mesh()``.

  Returns:
    (variables with every leaf replicated over ``mesh``, the checkpoint's step).

  Raises:
    FileNotFoundError: one line naming the directory when the checkpoint asked for is absent
      (and, for 'latest', ``config.init_from`` is empty).
  """
  mesh = create_mesh() if mesh is None else mesh
  model = create_model(config)
  restore = config.get('restore', 'latest')
  try:
    manager, step = checkpointing.resolve_restore(workdir, restore)
  except FileNotFoundError as e:
    if restore != 'latest' or not config.init_from:
      raise FileNotFoundError(f'{e}; train into --workdir={workdir} first or set '
                              '--config.init_from') from None
    logging.info('No checkpoint in %s: using config.init_from=%s', workdir, config.init_from)
    return checkpointing.place_replicated(initial_variables(config, model), mesh), 0
  step = agreed(step)
  abstract = abstract_train_state(config, model, optim.create_optimizer(config.optim), mesh)
  state = checkpointing.restore_step(manager, step, abstract)
  manager.close()
  logging.info('Restored checkpoint step %d (--config.restore=%s) of %s', step, restore, workdir)
  return {'params': state.params, 'batch_stats': state.batch_stats}, step


def restore_variables(config: ml_collections.ConfigDict, workdir: str,
                      mesh: jax.sharding.Mesh | None = None) -> dict:
  """``restore_variables_and_step`` without the step."""
  return restore_variables_and_step(config, workdir, mesh)[0]
