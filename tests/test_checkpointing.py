"""Checkpoints: corrupt-step fallback, failed saves, the best checkpoint, resolve_restore."""

import errno
import gc
import os
import subprocess
import sys
import textwrap

import grain
import jax
import numpy as np
import pytest
from etils import epath

from agrivision_jax import checkpointing
from two_processes import free_address, run_two_processes


def _state(seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {'params': {'w': rng.normal(size=(3, 5)).astype(np.float32)},
          'step': np.asarray(seed, np.int32)}


def _abstract(state):
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                     sharding=sharding), state)


def _iterator():
  return iter(grain.MapDataset.range(1000).to_iter_dataset())


def _save_steps(workdir, steps=(1, 2)):
  """Saves step s with _state(s) after drawing s elements of the iterator."""
  manager = checkpointing.create_manager(workdir)
  it = _iterator()
  for step in steps:
    while it.get_state()['next_index'] < step:
      next(it)
    checkpointing.save(manager, step, _state(step), it)
  manager.close()


def _truncate_arrays(step_dir: str) -> list[str]:
  """Truncates every array-data file of the state; returns them."""
  files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, 'state'))
           for f in names if os.path.basename(root) == 'd']
  assert files
  for f in files:
    os.truncate(f, 7)
  return files


def _delete_metadata(step_dir: str) -> list[str]:
  path = os.path.join(step_dir, 'state', '_METADATA')
  os.remove(path)
  return [path]


def _garbage_iterator(step_dir: str) -> list[str]:
  path = os.path.join(step_dir, 'data_iterator', 'process_0-of-1.json')
  with open(path, 'w') as f:
    f.write('{"next_index": 2')
  return [path]


@pytest.mark.parametrize('corrupt', [_truncate_arrays, _delete_metadata, _garbage_iterator])
def test_restore_newest_falls_back_past_a_corrupt_step(tmp_path, corrupt, caplog):
  workdir = str(tmp_path)
  _save_steps(workdir)
  damaged = corrupt(os.path.join(workdir, 'checkpoints', '2'))
  manager = checkpointing.create_manager(workdir)
  it = _iterator()
  step, state = checkpointing.restore_newest(manager, _abstract(_state(0)), it)
  assert step == 1
  np.testing.assert_array_equal(state['params']['w'], _state(1)['params']['w'])
  assert it.get_state() == {'next_index': 1}
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2.corrupt']
  assert manager.all_steps() == [1]
  logged = [r.getMessage() for r in caplog.records if 'step 2 does not restore' in r.getMessage()]
  assert len(logged) == 1 and '\n' not in logged[0]
  assert any(f'restore: {path}: ' in logged[0] for path in damaged), (damaged, logged[0])
  # The next save of step 2 does not collide with the renamed one; saving it again keeps it.
  checkpointing.save(manager, 2, _state(2), it)
  checkpointing.save(manager, 2, _state(5), it)
  assert manager.all_steps() == [1, 2]
  state = checkpointing.restore_step(manager, 2, _abstract(_state(0)))
  np.testing.assert_array_equal(state['params']['w'], _state(2)['params']['w'])
  manager.close()


def test_a_failed_restore_leaves_no_read_running_and_prints_nothing(tmp_path, capfd,
                                                                  monkeypatch):
  """A damaged step among many arrays: every read of it has ended when restore_newest returns,
  so nothing fails later on a closed event loop or when the reads' coroutines are collected."""
  unraisable = []
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  rng = np.random.default_rng(0)
  state = {f'w{i}': rng.normal(size=(30, 50)).astype(np.float32) for i in range(200)}
  manager = checkpointing.create_manager(str(tmp_path))
  for step in (1, 2):
    checkpointing.save(manager, step, state, _iterator())
  manager.close()
  _truncate_arrays(os.path.join(str(tmp_path), 'checkpoints', '2'))
  manager = checkpointing.create_manager(str(tmp_path))
  step, restored = checkpointing.restore_newest(manager, _abstract(state), _iterator())
  manager.close()
  gc.collect()
  assert step == 1 and restored.keys() == state.keys()
  assert unraisable == []
  assert 'Traceback' not in capfd.readouterr().err


def test_restore_newest_renames_nothing_when_no_step_restores(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir)
  manager = checkpointing.create_manager(workdir)
  wrong = _abstract({'params': {'w': np.zeros((4, 4), np.float32)}, 'step': np.int32(0)})
  with pytest.raises(checkpointing.CheckpointRestoreError, match='no checkpoint in .* restores'):
    checkpointing.restore_newest(manager, wrong, _iterator())
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2']
  manager.close()


def test_restore_newest_of_an_empty_directory_is_none(tmp_path):
  manager = checkpointing.create_manager(str(tmp_path))
  assert checkpointing.restore_newest(manager, _abstract(_state(0)), _iterator()) is None
  manager.close()


_FULL_DISK = textwrap.dedent('''
    import resource, signal, sys
    import grain, numpy as np
    from agrivision_jax import checkpointing
    manager = checkpointing.create_manager(sys.argv[1])
    it = iter(grain.MapDataset.range(10).to_iter_dataset())
    checkpointing.save(manager, 1, {'w': np.zeros(8, np.float32)}, it)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    try:
      checkpointing.save(manager, 2, {'w': np.random.rand(100000).astype(np.float32)}, it)
    except checkpointing.CheckpointSaveError as e:
      print('RAISED', e.errno, e)
      sys.exit(0)
    print('NOT RAISED')
''')


@pytest.mark.slow
def test_failed_save_raises_at_once_naming_file_and_errno(tmp_path):
  workdir = str(tmp_path)
  result = subprocess.run([sys.executable, '-c', _FULL_DISK, workdir], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, 'PYTHONPATH': os.getcwd()})
  line, = [l for l in result.stdout.splitlines() if l.startswith(('RAISED', 'NOT'))]
  assert line.startswith(f'RAISED {errno.EFBIG} '), result.stdout + result.stderr[-3000:]
  assert f'[Errno {errno.EFBIG} EFBIG]' in line
  assert os.path.join(workdir, 'checkpoints', '2') in line
  assert 'saving checkpoint step 2 failed' in line


def test_save_error_from_the_os_is_one_line(tmp_path, monkeypatch):
  workdir = str(tmp_path)
  manager = checkpointing.create_manager(workdir)

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device', os.path.join(workdir, 'checkpoints'))
  monkeypatch.setattr(manager, 'save', full)
  with pytest.raises(checkpointing.CheckpointSaveError) as raised:
    checkpointing.save(manager, 3, _state(3), _iterator())
  assert raised.value.errno == errno.ENOSPC
  assert str(raised.value) == (
      f'saving checkpoint step 3 failed: {workdir}/checkpoints: [Errno 28 ENOSPC] '
      'OSError: No space left on device')
  assert isinstance(raised.value, OSError)


def test_best_checkpoint_kept_apart_and_resolve_restore(tmp_path):
  workdir = str(tmp_path)
  _save_steps(workdir, steps=(1, 2, 3))
  best = checkpointing.BestCheckpoint(workdir)
  assert best.best() is None
  assert best.update(1, 0.30, _state(1))
  assert not best.update(2, float('nan'), _state(2))
  assert best.update(3, 0.45, _state(3))
  assert not best.update(4, 0.40, _state(4))
  assert not best.update(5, 0.45, _state(5))
  assert best.best() == (3, 0.45)
  assert best.update(3, 0.46, _state(3))   # step 3 again, after a resume from an older step
  assert best.best() == (3, 0.46)
  best.close()
  assert os.listdir(os.path.join(workdir, 'best')) == ['3']
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2', '3']
  assert checkpointing.BestCheckpoint(workdir).best() == (3, 0.46)   # survives a restart

  for restore, step, seed in [('best', 3, 3), ('latest', 3, 3), (2, 2, 2), ('1', 1, 1)]:
    manager, got = checkpointing.resolve_restore(workdir, restore)
    assert got == step
    state = checkpointing.restore_step(manager, got, _abstract(_state(0)))
    np.testing.assert_array_equal(state['params']['w'], _state(seed)['params']['w'])
    manager.close()
  with pytest.raises(FileNotFoundError, match=r'no checkpoint step 7 in .*checkpoints '
                                              r'\(steps there: \[1, 2, 3\]\)'):
    checkpointing.resolve_restore(workdir, 7)
  with pytest.raises(FileNotFoundError, match=f'no checkpoint directory {tmp_path}/other/best'):
    checkpointing.resolve_restore(str(tmp_path / 'other'), 'best')
  with pytest.raises(ValueError, match='config.restore'):
    checkpointing.resolve_restore(workdir, 'newest')


def test_paths_are_epath_and_keep_urls():
  assert str(checkpointing.checkpoint_dir('gs://bucket/run')) == 'gs://bucket/run/checkpoints'
  assert str(checkpointing.best_dir('gs://bucket/run/')) == 'gs://bucket/run/best'
  assert isinstance(checkpointing.checkpoint_dir('gs://bucket/run'), epath.Path)
  assert str(checkpointing.checkpoint_dir('rel')) == os.path.join(os.getcwd(), 'rel', 'checkpoints')


# Saves steps 1 and 2, or restores the newest, in one of two processes (1 CPU device each).
_TWO_PROCESSES = textwrap.dedent('''
    import os, sys
    import jax
    jax.config.update('jax_num_cpu_devices', 1)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    import grain, numpy as np
    from agrivision_jax import checkpointing
    workdir, mode = sys.argv[3], sys.argv[4]
    mesh = jax.make_mesh((2,), ('data',))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    it = iter(grain.MapDataset.range(100).to_iter_dataset())
    manager = checkpointing.create_manager(workdir)
    if mode == 'save':
      for step in (1, 2):
        next(it)
        w = checkpointing.place_replicated({'w': np.full((3, 2), step, np.float32)}, mesh)
        checkpointing.save(manager, step, w, it)
    else:
      abstract = {'w': jax.ShapeDtypeStruct((3, 2), np.float32, sharding=replicated)}
      step, restored = checkpointing.restore_newest(manager, abstract, it)
      print('RESTORED', step, float(np.asarray(restored['w'].addressable_data(0)).mean()),
            it.get_state()['next_index'], manager.all_steps(), flush=True)
    manager.close()
    jax.distributed.shutdown()
''')


def _run_two_processes(*args) -> list[str]:
  address = free_address()
  return run_two_processes(_TWO_PROCESSES, lambda i: [address, str(i), *args],
                           lambda i: {**os.environ, 'PYTHONPATH': os.getcwd()})


@pytest.mark.slow
def test_two_processes_agree_to_skip_a_step_damaged_for_one_of_them(tmp_path):
  workdir = str(tmp_path)
  _run_two_processes(workdir, 'save')
  damaged = os.path.join(workdir, 'checkpoints', '2', 'data_iterator',
                                                'process_1-of-2.json')
  with open(damaged, 'w') as f:
    f.write('garbage')
  outputs = _run_two_processes(workdir, 'restore')
  for output in outputs:
    assert [l for l in output.splitlines() if l.startswith('RESTORED')] == [
        'RESTORED 1 1.0 1 [1]'], output[-3000:]
  assert f'{damaged}: JSONDecodeError' in outputs[1]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['1', '2.corrupt']
