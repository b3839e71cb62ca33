"""Training and evaluation: the jitted train and eval steps and the loop around them.

The loop resumes from the newest checkpoint that restores, validates every
``config.eval_every_steps`` (keeping the best checkpoint apart), stops cleanly on the first
SIGTERM / SIGINT (at the end of the step in flight, or of the validation in flight; checkpoint
saved, ``preemption.Preempted`` raised) and counts the final validation as part of completing a
run. Mesh, sharding, model and train state come from
``agrivision_jax.experiment``.
"""

import functools
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
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from agrivision_jax import checkpointing
from agrivision_jax import data as data_lib
from agrivision_jax import experiment
from agrivision_jax import losses
from agrivision_jax import metrics as metrics_lib
from agrivision_jax import optim
from agrivision_jax import preemption
from agrivision_jax import progress
from agrivision_jax import writers


class NonFiniteLossError(FloatingPointError):
  """Raised when a training loss is NaN or infinite; the run's checkpoints are left as they were."""


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  """Train metrics of one step, merged over the steps between two log lines."""
  loss: clu_metrics.Average.from_output('loss')
  lr: clu_metrics.LastValue.from_output('lr')


def make_train_step(config: ml_collections.ConfigDict, model: flax.linen.Module,
                    mesh: jax.sharding.Mesh) -> Callable:
  """The jitted train step of ``model`` with ``config``'s loss, optimizer and seed on ``mesh``.

  Equal (model, config.loss, config.optim, config.seed, mesh) give the same jitted function (up
  to 8 are kept), so a second run in one process (a notebook, a sweep, the tests) reuses its
  traces and executables instead of tracing and compiling again.

  Returns:
    ``step(state, batch) -> (state, (TrainMetrics, counts))``; ``state`` is donated; ``batch``
    holds global image (B,H,W,Cin), labels (B,H,W,C), valid (B,H,W); ``counts`` is
    ``metrics.batch_counts`` of the batch (official confusion matrix (C,C) int32). The loss is
    ``losses.make_loss(config.loss, mesh)``; the 'lr' metric is the rate this step's update used;
    the dropout rng of step s is ``fold_in(key(seed) -> 1, s)``.
  """
  return _train_step(model, ml_collections.FrozenConfigDict(config.loss),
                     ml_collections.FrozenConfigDict(config.optim), config.seed, mesh)


@functools.lru_cache(maxsize=8)
def _train_step(model: flax.linen.Module, loss_config: ml_collections.FrozenConfigDict,
                optim_config: ml_collections.FrozenConfigDict, seed: int,
                mesh: jax.sharding.Mesh) -> Callable:
  loss_fn = losses.make_loss(loss_config, mesh)
  tx, lr_schedule = optim.create_optimizer(optim_config), optim.schedule(optim_config)
  replicated, data = experiment.replicated(mesh), NamedSharding(mesh, P('data'))
  dropout_root = jax.random.fold_in(jax.random.key(seed), 1)

  def step(state: experiment.TrainState, batch: dict[str, jax.Array]):
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
    new_state = experiment.TrainState(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state)
    step_metrics = TrainMetrics.single_from_model_output(loss=loss, lr=lr_schedule(state.step))
    counts = metrics_lib.batch_counts(logits, batch['labels'], batch['valid'])
    return new_state, (step_metrics, counts)

  batch_shardings = {key: data for key in experiment.BATCH_KEYS}
  return jax.jit(step, in_shardings=(replicated, batch_shardings),
                 out_shardings=(replicated, replicated), donate_argnums=(0,))


def make_eval_step(config: ml_collections.ConfigDict, model: flax.linen.Module,
                   mesh: jax.sharding.Mesh) -> Callable:
  """The jitted eval step of ``model`` with ``config``'s loss on ``mesh``; equal (model,
  config.loss, mesh) give the same jitted function, as in ``make_train_step``.

  Returns:
    ``step(variables, batch) -> (loss, counts)``: ``loss`` a clu Average of the batch loss
    weighted by its number of valid pixels (weight 0 for an all-padding batch), ``counts``
    ``metrics.batch_counts`` of the batch.
  """
  return _eval_step(model, ml_collections.FrozenConfigDict(config.loss), mesh)


@functools.lru_cache(maxsize=8)
def _eval_step(model: flax.linen.Module, loss_config: ml_collections.FrozenConfigDict,
               mesh: jax.sharding.Mesh) -> Callable:
  loss_fn = losses.make_loss(loss_config, mesh)
  replicated, data = experiment.replicated(mesh), NamedSharding(mesh, P('data'))

  def step(variables, batch):
    logits = model.apply(variables, batch['image'], train=False)
    valid_pixels = jnp.sum(batch['valid'], dtype=jnp.float32)
    loss = loss_fn(logits, batch['labels'], batch['valid'])
    weighted = clu_metrics.Average(total=jnp.where(valid_pixels > 0, loss * valid_pixels, 0.0),
                                   count=valid_pixels)
    return weighted, metrics_lib.batch_counts(logits, batch['labels'], batch['valid'])

  batch_shardings = {key: data for key in experiment.BATCH_KEYS}
  return jax.jit(step, in_shardings=(replicated, batch_shardings), out_shardings=replicated)


def evaluate_split(eval_step: Callable, variables: Mapping[str, Any], batches: Iterable,
                   mesh: jax.sharding.Mesh, names: tuple[str, ...]) -> dict[str, float]:
  """Runs ``eval_step`` over every batch of a split.

  Returns:
    {'loss': valid-pixel-weighted mean of the batch losses, **``SegmentationMetric.compute()``}.
  """
  metric = metrics_lib.SegmentationMetric(names)
  loss = clu_metrics.Average.empty()
  for batch in batches:
    batch_loss, counts = jax.device_get(eval_step(variables, experiment.shard_batch(batch, mesh)))
    metric.update(counts)
    loss = loss.merge(batch_loss)
  return {'loss': float(loss.compute()), **metric.compute()}


class _TrainLog:
  """Train metrics since the last log line: merged on device, fetched when written or checked."""

  def __init__(self, names: tuple[str, ...], step: int):
    self._names = names
    self._metrics: TrainMetrics | None = None
    self._counts: list = []
    self._start_step = self.checked_step = step
    self._start_time = time.perf_counter()

  def add(self, step_metrics: TrainMetrics, counts: dict[str, jax.Array]) -> None:
    self._metrics = step_metrics if self._metrics is None else self._metrics.merge(step_metrics)
    self._counts.append(counts)

  def check_finite(self, step: int, kept: Callable[[], str]) -> None:
    """Raises NonFiniteLossError if a loss since the last check is NaN / inf (one host sync)."""
    loss = float(self._metrics.loss.compute())
    if not np.isfinite(loss):
      raise NonFiniteLossError(
          f'training loss is {loss} within steps {self.checked_step + 1}-{step}; training '
          f'stopped and {kept()}. Lower config.optim.learning_rate or check the input data.')
    self.checked_step = step

  def exclude(self, seconds: float) -> None:
    """Leaves ``seconds`` (evaluation, checkpoint waits) out of the steps/s."""
    self._start_time += seconds

  def flush(self, step: int, global_batch: int) -> dict[str, float]:
    """The row of the steps since the last flush: loss, lr, miou, iou/<class>, steps/s."""
    computed = jax.device_get(self._metrics.compute())
    metric = metrics_lib.SegmentationMetric(self._names)
    for counts in jax.device_get(self._counts):
      metric.update(counts)
    steps_per_second = (step - self._start_step) / max(time.perf_counter() - self._start_time,
                                                      1e-9)
    self._metrics, self._counts = None, []
    self._start_step, self._start_time = step, time.perf_counter()
    return {'loss': float(computed['loss']), 'lr': float(computed['lr']), **metric.compute(),
            'steps_per_second': steps_per_second, 'throughput': steps_per_second * global_batch}


def _restore_or_init(config, workdir, model, tx, mesh, manager, train_iter):
  """(state, step, train_iter): the newest checkpoint that restores (the step process 0 found),
  else a fresh state at step 0."""
  abstract = experiment.abstract_train_state(config, model, tx, mesh)
  found = checkpointing.restore_newest(manager, abstract, train_iter)
  mine = found[0] if found else 0
  step = experiment.agreed(mine)
  state = found[1] if found else None
  if step != mine:  # this process saw other checkpoints than process 0: follow process 0
    logging.warning('process %d found checkpoint step %d, process 0 step %d: using %d',
                    jax.process_index(), mine, step, step)
    train_iter = data_lib.create_train_iterator(config.data, config.seed, jax.process_index(),
                                                jax.process_count())
    state = checkpointing.restore_step(manager, step, abstract, train_iter) if step else None
  if step:
    _log('Resuming from checkpoint step %d in %s', step, checkpointing.checkpoint_dir(workdir))
    return state, step, train_iter
  return experiment.create_train_state(config, model, tx, mesh), 0, train_iter


def _recorded_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` plus a 'resolved' section (conv kernels, channels, devices) for config.json."""
  recorded = ml_collections.ConfigDict(config.to_dict())
  recorded.resolved = experiment.resolved(config)
  return recorded


def _log(message: str, *args) -> None:
  if jax.process_index() == 0:
    logging.info(message, *args)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains ``config`` in ``workdir``, resuming from its newest checkpoint that restores.

  Writes ``workdir/{config.json, metrics.jsonl, checkpoints/, best/, events.out.tfevents.*}``
  (``workdir`` a local path or an etils.epath URL such as gs://...); validates on 'val' every
  ``eval_every_steps`` and at the end (the row with 'final'); each val row has best_miou and
  best_step. A run is complete when the final checkpoint AND the final validation are written: a
  restart with the final checkpoint but no final row runs the final validation again.

  Returns:
    The last validation metrics ({'loss', 'miou', 'iou/<class>', ...}); empty if the run was
    already complete.

  Raises:
    preemption.Preempted: a first SIGTERM / SIGINT; the step in flight finished and was saved.
    NonFiniteLossError: a NaN / inf loss; checkpoints saved before it are kept.
    checkpointing.CheckpointSaveError: a checkpoint could not be written (the run stops at once).
    writers.ConfigMismatchError: ``config`` differs from the workdir's config.json (nothing
      written).
    ValueError / FileNotFoundError: a bad config or input, naming the field or file.
  """
  mesh = experiment.setup(config)
  writers.check_config_compatible(config, workdir)
  model = experiment.create_model(config)
  tx = optim.create_optimizer(config.optim)
  names = data_lib.class_names(config.data.version)
  total = config.num_train_steps
  index, count = jax.process_index(), jax.process_count()
  manager = checkpointing.create_manager(workdir, config.max_checkpoints_to_keep)
  writer = best = None
  try:
    train_iter = data_lib.create_train_iterator(config.data, config.seed, index, count)
    state, start_step, train_iter = _restore_or_init(config, workdir, model, tx, mesh, manager,
                                                       train_iter)
    writers.write_config(_recorded_config(config), workdir)
    writer = writers.MetricWriter(workdir, resume_step=start_step)
    parameter_overview.log_parameter_overview(
        state.params, include_stats=False, msg=f'{config.model.arch} ibn={config.model.ibn_mode}',
        jax_logging_process=0)
    if start_step >= total and (start_step > total or experiment.agreed(
        writers.final_eval_done(workdir, start_step))):
      _log('%s already holds step %d and its final validation (config.num_train_steps=%d): '
           'nothing to do', workdir, start_step, total)
      return {}
    best = checkpointing.BestCheckpoint(workdir)
    eval_step = make_eval_step(config, model, mesh)

    def validate(step: int) -> dict[str, float]:
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      batches = data_lib.create_eval_iterator(config.data, 'val', index, count)
      result = evaluate_split(eval_step, variables, batches, mesh, names)
      best.update(step, result['miou'], state)
      best_step, best_miou = best.best() or (step, result['miou'])
      row = {**result, 'modality': config.data.modality, 'best_miou': best_miou,
             'best_step': best_step}
      writer.write(step, 'val', {**row, 'final': True} if step == total else row)
      _log('step %d  val mIoU %.4f  loss %.4f  (best %.4f at step %d)', step, result['miou'],
           result['loss'], best_miou, best_step)
      return result

    if start_step == total:
      _log('Final checkpoint step %d has no final validation: running it', total)
      return validate(total)

    def kept() -> str:
      manager.wait_until_finished()
      last = manager.latest_step()
      return (f'the last good checkpoint (step {last}) in {checkpointing.checkpoint_dir(workdir)}'
              ' is intact' if last is not None else 'no checkpoint had been saved yet')

    train_step = make_train_step(config, model, mesh)
    log = _TrainLog(names, start_step)
    val_metrics: dict[str, float] = {}
    with preemption.StopSignals() as stop:
      for step in range(start_step + 1, total + 1):
        state, (step_metrics, counts) = train_step(
            state, experiment.shard_batch(next(train_iter), mesh))
        log.add(step_metrics, counts)
        is_last = step == total
        stopping = not is_last and stop.requested()
        log_now = step % config.log_every_steps == 0 or is_last
        save_now = step % config.checkpoint_every_steps == 0 or is_last or stopping
        eval_now = step % config.eval_every_steps == 0 or is_last
        if log_now or save_now or eval_now:
          log.check_finite(step, kept)
        if log_now:
          row = log.flush(step, config.data.batch_size)
          _log(progress.format_progress('train', step, total, row['steps_per_second'],
                                        unit='steps', extra=f"loss {row['loss']:.4f}"))
          writer.write(step, 'train', row)
        if save_now:
          checkpointing.save(manager, step, state, train_iter)
        if eval_now:
          eval_start = time.perf_counter()
          val_metrics = validate(step)
          log.exclude(time.perf_counter() - eval_start)
        if stopping:  # the save above has returned: the checkpoint is written
          message = (f'stopped by a signal after step {step}: checkpoint saved in '
                     f'{checkpointing.checkpoint_dir(workdir)}; run the same command to resume')
          _log(message)
          raise preemption.Preempted(message, stop.signum)
    return val_metrics
  finally:
    manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
    if best is not None:
      best.close()


def evaluate(config: ml_collections.ConfigDict, workdir: str, split: str = 'val') -> dict:
  """Evaluates the checkpoint ``config.restore`` names ('latest' | 'best' | a step) on ``split``.

  ``config.data.modality`` may differ from training (Table 1's cross-modality runs) as long as the
  channel count matches; with 'latest' and no checkpoint, ``config.init_from`` is evaluated.
  Appends the result to ``metrics.jsonl`` at the checkpoint's step, with the modality.

  Returns:
    {'loss', **``SegmentationMetric.compute()``} over every example of the split.
  """
  mesh = experiment.setup(config, training=False)
  model = experiment.create_model(config)
  variables, step = experiment.restore_variables_and_step(config, workdir, mesh)
  names = data_lib.class_names(config.data.version)
  batches = data_lib.create_eval_iterator(config.data, split, jax.process_index(),
                                          jax.process_count())
  result = evaluate_split(make_eval_step(config, model, mesh), variables, batches, mesh, names)
  writer = writers.MetricWriter(workdir)
  writer.write(step, split, {**result, 'modality': config.data.modality,
                             'restore': str(config.restore)})
  writer.close()
  _log('%s (%s, step %d): mIoU %.4f  %s', split, config.data.modality, step, result['miou'],
       {k: round(v, 4) for k, v in result.items() if k.startswith('iou/')})
  return result
