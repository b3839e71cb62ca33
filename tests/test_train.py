"""Training loop on a tiny model and tiny synthetic data: learning, resume, preemption, the best
checkpoint, the final validation, sharding, NaN stop.

Every run here shares one model, loss and optimizer, so the later runs reuse the first one's
jitted train and eval steps (``train.make_train_step``) without tracing or compiling again.
"""

import json
import os
import pathlib
import shutil
import signal

import jax
import numpy as np
import pytest

from agrivision_jax import checkpointing
from agrivision_jax import data
from agrivision_jax import experiment
from agrivision_jax import preemption
from agrivision_jax import train
from agrivision_jax import writers
from step_equivalence import assert_same_step, flat, initial_variables, one_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING_FIELDS = ('steps_per_second', 'throughput')


@pytest.fixture
def config(tiny_config, synthetic_data_dir):
  """A fresh copy of the shared tiny config (conftest.tiny_config) on the shared synthetic data."""
  return tiny_config(synthetic_data_dir)


def records(workdir, split='train'):
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
          for r in writers.read_metrics(workdir) if r['split'] == split]


def assert_same_variables(a: dict, b: dict) -> None:
  a, b = flat(a), flat(b)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def restored(config, workdir, restore='latest'):
  config = config.copy_and_resolve_references()
  config.restore = str(restore)
  return experiment.restore_variables_and_step(config, workdir)


@pytest.fixture(scope='module')
def straight(tiny_config, synthetic_data_dir, tmp_path_factory):
  """An uninterrupted 6-step run validating every 2 steps: (config, workdir, result)."""
  config = tiny_config(synthetic_data_dir)
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  workdir = str(tmp_path_factory.mktemp('straight'))
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.mark.slow  # a training run
def test_loss_decreases_over_a_few_dozen_steps(config, tmp_path):
  config.num_train_steps = 30
  config.log_every_steps = 10
  config.checkpoint_every_steps = 30
  result = train.train_and_evaluate(config, str(tmp_path))
  rows = records(str(tmp_path))
  assert [r['step'] for r in rows] == [10, 20, 30]
  first, last = rows[0]['loss'], rows[-1]['loss']
  assert np.isfinite(first) and last < 0.85 * first, (first, last)
  assert set(result) >= {'loss', 'miou'} | {f'iou/{n}' for n in data.class_names('2020')}
  val, = records(str(tmp_path), 'val')
  assert val['step'] == 30 and val['miou'] == pytest.approx(result['miou']) and val['final']
  recorded = json.loads((tmp_path / 'config.json').read_text())
  assert recorded['model']['width'] == 8
  assert recorded['resolved']['conv_impl'] == 'cpu_gemm'  # 'auto' on the CPU backend
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(tmp_path))


@pytest.mark.slow  # a training run
def test_every_validation_records_the_best_and_restore_best_loads_it(straight):
  config, workdir, result = straight
  val = records(workdir, 'val')
  assert [r['step'] for r in val] == [2, 4, 6]
  assert val[-1]['final'] and not any(r.get('final') for r in val[:-1])
  for i, row in enumerate(val):
    best = max(val[:i + 1], key=lambda r: r['miou'])  # the first of equal values stays best
    assert (row['best_step'], row['best_miou']) == (best['step'], best['miou'])
  assert result['miou'] == val[-1]['miou']
  variables, step = restored(config, workdir, 'best')
  assert step == val[-1]['best_step']
  assert_same_variables(variables, restored(config, workdir, step)[0])
  assert restored(config, workdir, 'latest')[1] == 6


@pytest.mark.slow  # a training run
@pytest.mark.parametrize('restore', ['best', '4'])  # '4': as --config.restore=4 gives it
def test_evaluate_the_best_and_a_numbered_checkpoint(straight, tmp_path, restore):
  config, workdir, _ = straight
  copy = str(tmp_path / 'copy')
  shutil.copytree(workdir, copy)
  val = {r['step']: r for r in records(workdir, 'val')}
  step = val[6]['best_step'] if restore == 'best' else int(restore)
  config = config.copy_and_resolve_references()
  config.restore = restore
  result = train.evaluate(config, copy)
  row = records(copy, 'val')[-1]
  assert (row['step'], row['restore']) == (step, restore)
  # The same weights on the same split as the validation during training.
  assert row['miou'] == result['miou'] == val[step]['miou']
  assert row['loss'] == pytest.approx(val[step]['loss'], rel=1e-6)


@pytest.mark.slow  # a training run
def test_resume_gives_identical_params_and_metrics(straight, tmp_path):
  config, workdir, _ = straight
  config = config.copy_and_resolve_references()
  resumed = str(tmp_path)
  config.num_train_steps = 4
  train.train_and_evaluate(config, resumed)
  config.num_train_steps = 6
  train.train_and_evaluate(config, resumed)
  assert records(workdir) == records(resumed)
  # The 4-step run's last validation was its final one.
  assert [r.pop('final', False) for r in records(resumed, 'val')] == [False, True, True]
  assert [{k: v for k, v in r.items() if k != 'final'} for r in records(workdir, 'val')] == [
      {k: v for k, v in r.items() if k != 'final'} for r in records(resumed, 'val')]
  assert [r['step'] for r in records(resumed)] == [1, 2, 3, 4, 5, 6]
  assert_same_variables(restored(config, workdir)[0], restored(config, resumed)[0])


@pytest.mark.slow  # a training run
def test_first_signal_saves_and_stops_then_the_rerun_is_identical(straight, tmp_path,
                                                                   monkeypatch):
  config, workdir, _ = straight
  calls = []
  real_shard_batch = experiment.shard_batch

  def signal_during_step_3(batch, mesh):
    calls.append(1)
    if len(calls) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return real_shard_batch(batch, mesh)

  monkeypatch.setattr(experiment, 'shard_batch', signal_during_step_3)
  with pytest.raises(preemption.Preempted, match=r'stopped by a signal after step 3: checkpoint '
                                                 r'saved in .*checkpoints'):
    train.train_and_evaluate(config, str(tmp_path))
  assert list(checkpointing.create_manager(str(tmp_path), read_only=True).all_steps()) == [2, 3]
  monkeypatch.setattr(experiment, 'shard_batch', real_shard_batch)
  train.train_and_evaluate(config, str(tmp_path))
  assert records(workdir, 'val') == records(str(tmp_path), 'val')
  # Train rows of whole log intervals are identical (log_every_steps=1 here: all of them).
  assert records(workdir) == records(str(tmp_path))
  assert_same_variables(restored(config, workdir)[0], restored(config, str(tmp_path))[0])


@pytest.mark.slow  # a training run
def test_final_validation_is_part_of_completion(straight, tmp_path):
  config, workdir, _ = straight
  rerun = str(tmp_path / 'rerun')
  for name in ('checkpoints', 'best'):
    shutil.copytree(os.path.join(workdir, name), os.path.join(rerun, name))
  lines = pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines(keepends=True)
  final = [i for i, line in enumerate(lines) if json.loads(line).get('final')]
  assert len(final) == 1
  # As if killed during the final validation: everything but its row.
  pathlib.Path(rerun, 'metrics.jsonl').write_text(''.join(lines[:final[0]]))
  pathlib.Path(rerun, 'config.json').write_text(pathlib.Path(workdir, 'config.json').read_text())
  result = train.train_and_evaluate(config, rerun)
  assert records(rerun, 'val') == records(workdir, 'val')
  assert result['miou'] == records(workdir, 'val')[-1]['miou']
  assert train.train_and_evaluate(config, rerun) == {}  # complete: nothing to do
  assert records(rerun, 'val') == records(workdir, 'val')


@pytest.mark.slow  # a training run
def test_a_different_model_is_refused_before_anything_is_written(straight):
  config, workdir, _ = straight
  before = {name: pathlib.Path(workdir, name).read_bytes()
            for name in ('config.json', 'metrics.jsonl')}
  config = config.copy_and_resolve_references()
  config.model.width = 16
  with pytest.raises(writers.ConfigMismatchError, match='model.width'):
    train.train_and_evaluate(config, workdir)
  assert before == {name: pathlib.Path(workdir, name).read_bytes() for name in before}


@pytest.mark.slow  # a training run
def test_failed_save_stops_the_run_at_once(config, tmp_path, monkeypatch):
  config.checkpoint_every_steps = 2

  def failing_save(manager, step, state, data_iterator):
    raise checkpointing.CheckpointSaveError(f'cannot write {tmp_path}/checkpoints/{step}: '
                                            'No space left on device')

  monkeypatch.setattr(checkpointing, 'save', failing_save)
  with pytest.raises(checkpointing.CheckpointSaveError, match='No space left on device'):
    train.train_and_evaluate(config, str(tmp_path))
  assert [r['step'] for r in records(str(tmp_path))] == [1, 2]


@pytest.mark.slow  # a training run
def test_eight_devices_equal_one_device_after_a_step(config):
  # Two examples per device: with one, XLA:CPU's float32 rounding differs more from the unsharded
  # computation and the freshly initialised stage 4 amplifies it to ~1% of the update (measured;
  # 1, 2 and 4 devices with >= 2 examples each agree to 2e-5).
  config.data.batch_size = 16
  batch = next(data.create_train_iterator(config.data, config.seed, 0, 1))
  assert len(jax.devices()) == 8
  loss_1, variables_1 = one_step(config, jax.devices()[:1], batch)
  loss_8, variables_8 = one_step(config, jax.devices(), batch)
  assert_same_step(loss_8, variables_8, loss_1, variables_1, initial_variables(config))


@pytest.mark.slow  # a training run
def test_nan_loss_stops_and_last_checkpoint_restores(config, tmp_path, monkeypatch):
  config.checkpoint_every_steps = 2
  config.log_every_steps = 100
  calls = []
  real_shard_batch = experiment.shard_batch

  def shard_batch_with_nan_at_step_4(batch, mesh):
    calls.append(1)
    if len(calls) == 4:
      batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
    return real_shard_batch(batch, mesh)

  monkeypatch.setattr(experiment, 'shard_batch', shard_batch_with_nan_at_step_4)
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteLossError,
                     match=r'training loss is nan within steps 3-4; training stopped and the last '
                           r'good checkpoint \(step 2\) in .*checkpoints is intact'):
    train.train_and_evaluate(config, workdir)
  manager = checkpointing.create_manager(workdir, read_only=True)
  assert list(manager.all_steps()) == [2]
  variables, step = restored(config, workdir)
  assert step == 2 and all(np.isfinite(v).all() for v in flat(variables).values())


@pytest.mark.slow
def test_init_from_replaces_exactly_the_converted_leaves(config, tmp_path, monkeypatch):
  from agrivision_jax import convert  # pylint: disable=g-import-not-at-top
  model = experiment.create_model(config)
  fresh = jax.device_get(experiment.initial_variables(config, model))
  kernel = fresh['params']['backbone']['conv1']['kernel']
  loaded = {'params': {'backbone': {'conv1': {'kernel': np.full(kernel.shape, 0.25)}}},
            'batch_stats': {'backbone': {'bn1': {'mean': np.full((8,), 0.5)}}}}
  calls = []
  monkeypatch.setattr(convert, 'load_variables',
                      lambda directory, model_config: calls.append(directory) or loaded)
  config.init_from = str(tmp_path / 'converted')
  merged = flat(experiment.initial_variables(config, model))
  assert calls == [config.init_from]
  expected = flat(fresh)
  expected["['params']['backbone']['conv1']['kernel']"] = np.full(kernel.shape, 0.25, np.float32)
  expected["['batch_stats']['backbone']['bn1']['mean']"] = np.full((8,), 0.5, np.float32)
  assert merged.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(merged[key], expected[key], err_msg=key)
  # Without a checkpoint in the workdir, restore 'latest' falls back to init_from.
  variables, step = restored(config, str(tmp_path / 'untrained'))
  assert step == 0
  np.testing.assert_array_equal(flat(variables)["['params']['backbone']['conv1']['kernel']"],
                                0.25)

  loaded['params']['backbone']['conv9'] = {'kernel': np.zeros((1,))}
  with pytest.raises(ValueError, match=r"config.init_from=.*converted: variables the model does "
                                       r"not have: \['params/backbone/conv9/kernel'\]"):
    experiment.initial_variables(config, model)
  del loaded['params']['backbone']['conv9']
  loaded['params']['backbone']['conv1']['kernel'] = np.zeros((7, 7, 3, 8))
  with pytest.raises(ValueError, match=r'shape mismatch: \[.params/backbone/conv1/kernel: '
                                       r'\(7, 7, 3, 8\) vs model \(7, 7, 4, 8\)'):
    experiment.initial_variables(config, model)


@pytest.mark.parametrize('restore', ['latest', 'best', 3])
def test_restore_without_checkpoint_names_the_workdir(config, tmp_path, restore):
  with pytest.raises(FileNotFoundError, match=f'{tmp_path}.*train into --workdir={tmp_path} '
                                              'first or set --config.init_from'):
    restored(config, str(tmp_path), restore)


@pytest.mark.parametrize('field,value', [('loss.lambda_dice', 0.5), ('optim.momentum', 0.8),
                                         ('seed', 7), ('model.width', 16)])
def test_equal_configs_share_one_jitted_step_and_any_difference_builds_another(config, field,
                                                                               value, set_field):
  mesh = experiment.create_mesh()
  step = train.make_train_step(config, experiment.create_model(config), mesh)
  eval_step = train.make_eval_step(config, experiment.create_model(config), mesh)
  same = config.copy_and_resolve_references()
  model, fresh_mesh = experiment.create_model(same), experiment.create_mesh()
  assert train.make_train_step(same, model, fresh_mesh) is step
  assert train.make_eval_step(same, model, fresh_mesh) is eval_step
  set_field(same, field, value)
  section = field.rpartition('.')[0]
  assert train.make_train_step(same, experiment.create_model(same), mesh) is not step
  assert train.make_train_step(config, experiment.create_model(config), experiment.create_mesh(
      jax.devices()[:4])) is not step
  changes_eval = section in ('loss', 'model')
  assert (train.make_eval_step(same, experiment.create_model(same), mesh) is not eval_step) == (
      changes_eval)
