"""Training and evaluation: one jitted, sharded train step on a device mesh; checkpoints; resume.

The global batch is split over a 1-D mesh of every device (axis 'data'); parameters, norm
statistics and optimizer state are replicated, so BatchNorm / SwitchableNorm statistics are over
the global batch (SyncBN semantics). Each process loads its own share of every batch and the
global arrays are assembled with ``jax.make_array_from_process_local_data``; the same code runs on
one CPU, one GPU or a multi-host pod.
"""

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from agrivision_jax import checkpointing
from agrivision_jax import configuration
from agrivision_jax import data as data_lib
from agrivision_jax import losses
from agrivision_jax import metrics as metrics_lib
from agrivision_jax import models
from agrivision_jax import optim
from agrivision_jax import writers

BATCH_KEYS = ('image', 'labels', 'valid')


class NonFiniteLossError(FloatingPointError):
  """Raised when a training loss is NaN or infinite; the run's checkpoints are left as they were."""


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


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Starts multi-host JAX when ``config.distributed`` or ``JAX_COORDINATOR_ADDRESS`` asks for it.

  Must run before anything touches a device. The coordinator address, process count and id come
  from ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` when set, else from
  the cluster (TPU pod, SLURM, Open MPI, Kubernetes). CPU collectives use gloo.
  """
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not (config.get('distributed', False) or address):
    return
  if jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  count, index = os.environ.get('JAX_NUM_PROCESSES'), os.environ.get('JAX_PROCESS_ID')
  jax.distributed.initialize(
      coordinator_address=address,
      num_processes=int(count) if count else None,
      process_id=int(index) if index else None)


def create_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over ``devices`` (default: every device of every process)."""
  devices = jax.devices() if devices is None else devices
  return jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))


def setup_inference(config: ml_collections.ConfigDict, batch_size: int,
                    batch_field: str) -> tuple[jax.sharding.Mesh, flax.linen.Module]:
  """The shared start of the inference modes (divergence, predict).

  Initialises multi-host JAX when asked, validates ``config``, checks the mode's global batch
  size against the device count, and builds the mesh and the model.

  Args:
    config: the full config.
    batch_size: the mode's global batch size.
    batch_field: its config field, named in the error (e.g. 'config.predict.batch_size').

  Returns:
    (mesh from ``create_mesh``, ``models.create_model(config.model)``).

  Raises:
    ValueError: a bad config field, named; ``batch_size`` not divisible by the device count.
  """
  maybe_initialize_distributed(config)
  configuration.validate(config, jax.device_count(), jax.process_count())
  if batch_size % jax.device_count():
    raise ValueError(f'{batch_field}={batch_size} must be divisible by the number of devices '
                     f'({jax.device_count()})')
  return create_mesh(), models.create_model(config.model)


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


def _replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def initial_variables(config: ml_collections.ConfigDict, model: flax.linen.Module) -> dict:
  """Fresh {'params', 'batch_stats'} (host arrays) with ``config.init_from``'s leaves copied in.

  The converted directory (``agrivision_jax.convert``) may hold every variable (a full
  checkpoint) or the backbone only (ImageNet weights); the rest stays freshly initialised.
  """
  image_shape = (1, config.data.image_size, config.data.image_size, config.model.in_channels)
  key = jax.random.fold_in(jax.random.key(config.seed), 0)
  variables = jax.device_get(models.init_variables(model, key, image_shape))
  if config.init_from:
    from agrivision_jax import convert  # pylint: disable=g-import-not-at-top (optional, heavy)
    loaded = convert.load_variables(config.init_from, config.model)
    variables = checkpointing.merge_variables(variables, loaded,
                                              f'config.init_from={config.init_from}')
  return variables


def create_train_state(config: ml_collections.ConfigDict, model: flax.linen.Module,
                       tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
  """Initialises the model (``initial_variables``) and the optimizer, replicated over ``mesh``.

  Args:
    config: the experiment config (seed, model, data.image_size, init_from).
    model: ``models.create_model(config.model)``.
    tx: ``optim.create_optimizer(config.optim)``.
    mesh: from ``create_mesh``.

  Returns:
    A TrainState at step 0 with every leaf replicated over ``mesh``.
  """
  replicated = _replicated(mesh)
  variables = checkpointing.place_replicated(initial_variables(config, model), mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init(params, batch_stats):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                      opt_state=tx.init(params))

  return init(variables['params'], variables.get('batch_stats', {}))


def abstract_train_state(config: ml_collections.ConfigDict, model: flax.linen.Module,
                         tx: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> TrainState:
  """The TrainState's structure as ShapeDtypeStructs with replicated shardings (no compute)."""
  image_shape = (1, config.data.image_size, config.data.image_size, config.model.in_channels)

  def init():
    variables = models.init_variables(model, jax.random.key(0), image_shape)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables['params'],
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=tx.init(variables['params']))

  replicated = _replicated(mesh)
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                      jax.eval_shape(init))


def make_train_step(model: flax.linen.Module, loss_fn: Callable, tx: optax.GradientTransformation,
                    lr_schedule: optax.Schedule, mesh: jax.sharding.Mesh, seed: int) -> Callable:
  """Builds the jitted train step.

  Args:
    model: the DeepLabV3+ module.
    loss_fn: ``losses.make_loss(config.loss)``: (logits, labels, valid) -> scalar.
    tx: the optimizer.
    lr_schedule: for the 'lr' metric (the rate this step's update used).
    mesh: batch sharded over its 'data' axis, everything else replicated.
    seed: the dropout rng of step s is ``fold_in(key(seed) -> 1, s)``.

  Returns:
    ``step(state, batch) -> (state, metrics)``; ``state`` is donated; ``batch`` holds global
    image (B,H,W,Cin), labels (B,H,W,C), valid (B,H,W); metrics: 'loss' f32 scalar, 'lr' f32
    scalar, 'confusion' (C,C) int32 official confusion matrix of the batch.
  """
  replicated, data = _replicated(mesh), NamedSharding(mesh, P('data'))
  dropout_root = jax.random.fold_in(jax.random.key(seed), 1)

  def step(state: TrainState, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(dropout_root, state.step)

    def loss_and_aux(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, batch['image'], train=True,
          mutable=['batch_stats'], rngs={'dropout': rng})
      loss = loss_fn(logits, batch['labels'], batch['valid'])
      return loss, (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                           batch_stats=batch_stats, opt_state=opt_state)
    step_metrics = {
        'loss': loss, 'lr': lr_schedule(state.step),
        'confusion': metrics_lib.confusion_matrix(logits, batch['labels'], batch['valid']),
    }
    return new_state, step_metrics

  batch_shardings = {key: data for key in BATCH_KEYS}
  return jax.jit(step, in_shardings=(replicated, batch_shardings),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(model: flax.linen.Module, loss_fn: Callable,
                   mesh: jax.sharding.Mesh) -> Callable:
  """Builds the jitted eval step.

  Returns:
    ``step(variables, batch) -> metrics``: 'confusion' (C,C) int32, 'loss_sum' = batch loss times
    its number of valid pixels (0 for an all-padding batch), 'valid_pixels' f32.
  """
  replicated, data = _replicated(mesh), NamedSharding(mesh, P('data'))

  def step(variables, batch):
    logits = model.apply(variables, batch['image'], train=False)
    valid_pixels = jnp.sum(batch['valid'], dtype=jnp.float32)
    loss = loss_fn(logits, batch['labels'], batch['valid'])
    return {
        'confusion': metrics_lib.confusion_matrix(logits, batch['labels'], batch['valid']),
        'loss_sum': jnp.where(valid_pixels > 0, loss * valid_pixels, 0.0),
        'valid_pixels': valid_pixels,
    }

  batch_shardings = {key: data for key in BATCH_KEYS}
  return jax.jit(step, in_shardings=(replicated, batch_shardings), out_shardings=replicated)


def evaluate_split(eval_step: Callable, variables: Mapping[str, Any], batches: Iterable,
                   mesh: jax.sharding.Mesh, names: tuple[str, ...]) -> dict[str, float]:
  """Runs ``eval_step`` over every batch of a split.

  Returns:
    {'loss': valid-pixel-weighted mean of the batch losses, 'miou', 'iou/<class>'} (official rule).
  """
  metric = metrics_lib.ConfusionMetric(num_classes=len(names), class_names=names)
  loss_sum = valid_pixels = 0.0
  for batch in batches:
    out = jax.device_get(eval_step(variables, shard_batch(batch, mesh)))
    metric.update(out['confusion'])
    loss_sum += float(out['loss_sum'])
    valid_pixels += float(out['valid_pixels'])
  return {'loss': loss_sum / max(valid_pixels, 1.0), **metric.compute()}


@dataclasses.dataclass
class _Interval:
  """Train metrics since the last write: device values not yet fetched, then host values."""
  pending: list = dataclasses.field(default_factory=list)
  fetched: list = dataclasses.field(default_factory=list)
  start_step: int = 0
  start_time: float = 0.0


def _check_finite(step_losses: list[float], first_step: int, manager, workdir: str) -> None:
  """Raises NonFiniteLossError for the first non-finite loss (of step ``first_step + i``)."""
  for offset, loss in enumerate(step_losses):
    if not np.isfinite(loss):
      manager.wait_until_finished()
      last = manager.latest_step()
      kept = (f'the last good checkpoint (step {last}) in {checkpointing.checkpoint_dir(workdir)}'
              ' is intact' if last is not None else 'no checkpoint had been saved yet')
      raise NonFiniteLossError(
          f'training loss is {loss} at step {first_step + offset}; training stopped and {kept}. '
          'Lower config.optim.learning_rate or check the input data.')


def _build(config: ml_collections.ConfigDict):
  model = models.create_model(config.model)
  loss_fn = losses.make_loss(config.loss)
  return model, loss_fn


def _setup(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  maybe_initialize_distributed(config)
  configuration.validate(config, jax.device_count(), jax.process_count())
  return create_mesh()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Writes ``workdir/{config.json, metrics.jsonl, checkpoints/, events.out.tfevents.*}``; evaluates
  on 'val' every ``eval_every_steps`` and at the end.

  Returns:
    The last validation metrics ({'loss', 'miou', 'iou/<class>'}); empty if nothing was trained.

  Raises:
    NonFiniteLossError: a NaN / inf loss; checkpoints saved before it are kept.
    ValueError / FileNotFoundError: a bad config, naming the field.
  """
  mesh = _setup(config)
  writers.write_config(config, workdir)
  model, loss_fn = _build(config)
  tx, lr_schedule = optim.create_optimizer(config.optim), optim.schedule(config.optim)
  names = data_lib.class_names(config.data.version)
  manager = checkpointing.create_manager(workdir, config.max_checkpoints_to_keep)
  start_step = manager.latest_step() or 0
  if start_step >= config.num_train_steps:
    logging.info('%s already holds step %d >= config.num_train_steps=%d: nothing to train',
                 workdir, start_step, config.num_train_steps)
    manager.close()
    return {}
  index, count = jax.process_index(), jax.process_count()
  train_iter = data_lib.create_train_iterator(config.data, config.seed, index, count)
  if start_step:
    logging.info('Resuming from checkpoint step %d in %s', start_step, workdir)
    state = checkpointing.restore(manager, start_step,
                                  abstract_train_state(config, model, tx, mesh), train_iter)
  else:
    state = create_train_state(config, model, tx, mesh)
  train_step = make_train_step(model, loss_fn, tx, lr_schedule, mesh, config.seed)
  eval_step = make_eval_step(model, loss_fn, mesh)
  writer = writers.MetricWriter(workdir)
  global_batch = config.data.batch_size
  interval = _Interval(start_step=start_step, start_time=time.perf_counter())
  val_metrics: dict[str, float] = {}
  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      state, step_metrics = train_step(state, shard_batch(next(train_iter), mesh))
      interval.pending.append(step_metrics)
      is_last = step == config.num_train_steps
      log_now = step % config.log_every_steps == 0 or is_last
      save_now = step % config.checkpoint_every_steps == 0 or is_last
      eval_now = step % config.eval_every_steps == 0 or is_last
      if log_now or save_now or eval_now:
        _flush_train_metrics(interval, step, writer, config.num_train_steps, names,
                             global_batch, manager, workdir, write=log_now)
      if save_now:
        checkpointing.save(manager, step, state, train_iter)
      if eval_now:
        eval_start = time.perf_counter()
        variables = {'params': state.params, 'batch_stats': state.batch_stats}
        batches = data_lib.create_eval_iterator(config.data, 'val', index, count)
        val_metrics = evaluate_split(eval_step, variables, batches, mesh, names)
        writer.write(step, 'val', {**val_metrics, 'modality': config.data.modality})
        logging.info('step %d  val mIoU %.4f  loss %.4f', step, val_metrics['miou'],
                     val_metrics['loss'])
        interval.start_time += time.perf_counter() - eval_start  # steps/s counts training only
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  return val_metrics


def _flush_train_metrics(interval: _Interval, step: int, writer: writers.MetricWriter,
                         total_steps: int, names: tuple[str, ...], global_batch: int,
                         manager, workdir: str, write: bool) -> None:
  """Fetches the pending step metrics, stops on a non-finite loss, and writes them if ``write``."""
  new = jax.device_get(interval.pending)
  interval.pending.clear()
  _check_finite([float(m['loss']) for m in new], step - len(new) + 1, manager, workdir)
  interval.fetched.extend(new)
  if not write:
    return
  elapsed = max(time.perf_counter() - interval.start_time, 1e-9)
  steps_per_second = (step - interval.start_step) / elapsed
  metric = metrics_lib.ConfusionMetric(num_classes=len(names), class_names=names)
  for m in interval.fetched:
    metric.update(m['confusion'])
  loss = float(np.mean([m['loss'] for m in interval.fetched]))
  logging.info(writers.progress_line(step, total_steps, loss, steps_per_second))
  writer.write(step, 'train', {
      'loss': loss, 'lr': float(interval.fetched[-1]['lr']), **metric.compute(),
      'steps_per_second': steps_per_second, 'throughput': steps_per_second * global_batch})
  interval.fetched.clear()
  interval.start_step, interval.start_time = step, time.perf_counter()


def restore_variables(config: ml_collections.ConfigDict, workdir: str,
                      mesh: jax.sharding.Mesh | None = None) -> dict:
  """Loads {'params', 'batch_stats'}: the workdir's latest checkpoint, else ``config.init_from``.

  Args:
    config: the experiment config (its model must match the checkpoint).
    workdir: a training run's directory.
    mesh: where to put the (replicated) variables; default ``create_mesh()``.

  Returns:
    The variables, every leaf replicated over ``mesh``.

  Raises:
    FileNotFoundError: naming ``workdir`` when it has no checkpoint and ``init_from`` is empty.
  """
  return _restore_variables_and_step(config, workdir, mesh)[0]


def _restore_variables_and_step(config, workdir: str, mesh) -> tuple[dict, int]:
  mesh = create_mesh() if mesh is None else mesh
  model = models.create_model(config.model)
  path = checkpointing.checkpoint_dir(workdir)
  if os.path.isdir(path):
    manager = checkpointing.create_manager(workdir, read_only=True)
    step = manager.latest_step()
    if step is not None:
      abstract = abstract_train_state(config, model, optim.create_optimizer(config.optim), mesh)
      state = checkpointing.restore(manager, step, abstract)
      manager.close()
      logging.info('Restored checkpoint step %d from %s', step, path)
      return {'params': state.params, 'batch_stats': state.batch_stats}, step
  if config.init_from:
    return checkpointing.place_replicated(initial_variables(config, model), mesh), 0
  raise FileNotFoundError(
      f'no checkpoint in {path} and config.init_from is empty: '
      f'train into --workdir={workdir} first or set --config.init_from')


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str = 'val') -> dict:
  """Evaluates the workdir's latest checkpoint (else ``init_from``) on ``split`` of ``config.data``.

  ``config.data.modality`` may differ from training (Table 1's cross-modality runs) as long as the
  channel count matches. Appends the result to ``metrics.jsonl`` at the checkpoint's step, with
  the modality.

  Returns:
    {'loss', 'miou', 'iou/<class>'} over every example of the split.
  """
  mesh = _setup(config)
  model, loss_fn = _build(config)
  variables, step = _restore_variables_and_step(config, workdir, mesh)
  names = data_lib.class_names(config.data.version)
  batches = data_lib.create_eval_iterator(config.data, split, jax.process_index(),
                                          jax.process_count())
  result = evaluate_split(make_eval_step(model, loss_fn, mesh), variables, batches, mesh, names)
  writer = writers.MetricWriter(workdir)
  writer.write(step, split, {**result, 'modality': config.data.modality})
  writer.close()
  logging.info('%s (%s): mIoU %.4f  %s', split, config.data.modality, result['miou'],
               {k: round(v, 4) for k, v in result.items() if k.startswith('iou/')})
  return result
