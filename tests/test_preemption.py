"""StopSignals: a first SIGTERM / SIGINT is a request, a second ends the process at once."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from agrivision_jax import checkpointing
from agrivision_jax import preemption
from agrivision_jax import writers
from two_processes import free_address, run_two_processes

# Counts loop iterations; reports when the request is seen and that it keeps running after it.
_LOOP = textwrap.dedent('''
    import sys, time
    from agrivision_jax import preemption
    with preemption.StopSignals() as stop:
      print('READY', flush=True)
      seen = None
      for i in range(100000):
        time.sleep(0.01)
        if stop.requested() and seen is None:
          seen = i
          print('REQUESTED', preemption.signal.Signals(stop.signum).name, flush=True)
        if seen is not None and i == seen + 20:
          print('CONTINUED', flush=True)
        if seen is not None and i == seen + 1000:
          break
    print('DONE', flush=True)
''')


def _start():
  process = subprocess.Popen([sys.executable, '-c', _LOOP], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, 'PYTHONPATH': os.getcwd()})
  assert process.stdout.readline() == 'READY\n'
  return process


@pytest.mark.slow
@pytest.mark.parametrize('first,second', [(signal.SIGTERM, signal.SIGTERM),
                                          (signal.SIGINT, signal.SIGINT),
                                          (signal.SIGINT, signal.SIGTERM)])
def test_first_signal_requests_second_exits(first, second):
  process = _start()
  try:
    process.send_signal(first)
    assert process.stdout.readline() == f'REQUESTED {first.name}\n'
    assert process.stdout.readline() == 'CONTINUED\n'
    assert process.poll() is None
    process.send_signal(second)
    stdout, stderr = process.communicate(timeout=60)
  finally:
    process.kill()
  assert process.returncode == -second   # killed by the signal: the shell shows 128 + signum
  assert 'DONE' not in stdout
  assert 'KeyboardInterrupt' not in stderr and 'Traceback' not in stderr
  assert f'received {first.name}: stopping after the current step' in stderr


def test_handlers_restored_on_exit():
  previous = signal.getsignal(signal.SIGINT)
  with preemption.StopSignals() as stop:
    assert signal.getsignal(signal.SIGINT) == stop._handle  # pylint: disable=protected-access
    assert not stop.requested()
  assert signal.getsignal(signal.SIGINT) is previous
  with pytest.raises(ValueError, match='sync_every_steps'):
    preemption.StopSignals(sync_every_steps=0)


# Ctrl-C reaches the whole process group; the grain worker must keep feeding the main process.
_GRAIN = textwrap.dedent('''
    import os, signal, time
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    import grain
    from agrivision_jax import preemption
    if __name__ == '__main__':
      dataset = grain.MapDataset.range(10000).map(lambda x: x * 2).to_iter_dataset()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=1),
                                    worker_init_fn=preemption.worker_init)
      with preemption.StopSignals() as stop:
        iterator = iter(dataset)
        next(iterator)
        os.killpg(os.getpgid(0), signal.SIGINT)
        time.sleep(2)   # the worker would be dead by now without worker_init
        print('REQUESTED', stop.requested(), flush=True)
        print('LAST', [next(iterator) for _ in range(500)][-1], flush=True)
      os._exit(0)   # no clean-up: the test kills the process group afterwards
''')


@pytest.mark.slow
def test_grain_workers_survive_the_terminal_sigint(tmp_path):
  script = tmp_path / 'grain_sigint.py'   # a file: grain's spawned workers re-import __main__
  script.write_text(_GRAIN)
  process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, 'PYTHONPATH': os.getcwd()},
                             start_new_session=True)   # its own process group to signal
  try:
    process.wait(timeout=120)
  finally:
    try:  # the orphaned worker holds the output pipes open
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  stdout, stderr = process.communicate()
  assert stdout == 'REQUESTED True\nLAST 1000\n', stderr[-3000:]
  assert 'KeyboardInterrupt' not in stderr


# Two processes; only process 1 is signalled; both must see the request at the same call.
_AGREE = textwrap.dedent('''
    import os, signal, sys
    import jax
    jax.config.update('jax_num_cpu_devices', 1)
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
    from agrivision_jax import preemption
    with preemption.StopSignals(sync_every_steps=3) as stop:
      for call in range(1, 40):
        if call == 5 and jax.process_index() == 1:
          os.kill(os.getpid(), signal.SIGTERM)
        if stop.requested():
          print('STOP AT', call, flush=True)
          break
    jax.distributed.shutdown()
''')


@pytest.mark.slow
def test_request_agreed_across_processes():
  address = free_address()
  outputs = run_two_processes(_AGREE, lambda i: [address, str(i)],
                              lambda i: {**os.environ, 'PYTHONPATH': os.getcwd()})
  for output in outputs:
    # Signalled at call 5, agreed at the next multiple of 3.
    assert [l for l in output.splitlines() if l.startswith('STOP')] == ['STOP AT 6'], output


# A training loop as train.py runs it: lock, restore the newest checkpoint, truncate metrics,
# stop on a signal after saving. Each step records the element the data iterator gave it.
_TRAIN = textwrap.dedent('''
    import os, signal, sys, time
    import grain, jax, numpy as np
    from agrivision_jax import checkpointing, preemption, workdir, writers
    def main(path, die_at):
      with workdir.lock(path), preemption.StopSignals() as stop:
        manager = checkpointing.create_manager(path)
        data = iter(grain.MapDataset.range(10**6).to_iter_dataset())
        abstract = {'x': jax.ShapeDtypeStruct((), np.int64,
                                              sharding=jax.sharding.SingleDeviceSharding(
                                                  jax.devices()[0]))}
        restored = checkpointing.restore_newest(manager, abstract, data)
        start = restored[0] if restored else 0
        writer = writers.MetricWriter(path, resume_step=start)
        print('RESUMED', start, flush=True)
        for step in range(start + 1, 10**6):
          x = next(data)
          time.sleep(0.02)
          writer.write(step, 'train', {'x': x})
          if step == die_at:   # killed after writing rows past the last checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
          if step == start + 5:
            print('RUNNING', flush=True)
          if step % 3 == 0:
            checkpointing.save(manager, step, {'x': np.int64(x)}, data)
          if stop.requested():
            checkpointing.save(manager, step, {'x': np.int64(x)}, data)
            raise preemption.Preempted(f'stopped at step {step}', stop.signum)
    try:
      main(sys.argv[1], int(sys.argv[2]))
    except preemption.Preempted as stopped:
      print('PREEMPTED', stopped, flush=True)
      sys.exit(stopped.exit_status)
''')


@pytest.mark.slow
def test_preempted_training_resumes_without_lost_or_repeated_steps(tmp_path):
  workdir = str(tmp_path / 'run')

  def start(die_at=0):
    process = subprocess.Popen([sys.executable, '-c', _TRAIN, workdir, str(die_at)],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, 'PYTHONPATH': os.getcwd()})
    resumed = process.stdout.readline()
    assert resumed.startswith('RESUMED '), process.communicate()[1][-3000:]
    return process, int(resumed.split()[1])

  killed, first_start = start(die_at=4)
  killed.communicate(timeout=120)
  assert killed.returncode == -signal.SIGKILL and first_start == 0
  assert [r['step'] for r in writers.read_metrics(workdir)] == [1, 2, 3, 4]
  preempted, resumed_at = start()
  assert resumed_at == 3
  assert preempted.stdout.readline() == 'RUNNING\n'
  preempted.send_signal(signal.SIGTERM)
  stdout, stderr = preempted.communicate(timeout=120)
  assert preempted.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  stopped_at = int(stdout.split('PREEMPTED stopped at step ')[1])
  records = writers.read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, stopped_at + 1))
  assert [r['x'] for r in records] == [float(step - 1) for step in range(1, stopped_at + 1)]
  manager = checkpointing.create_manager(workdir, read_only=True)
  assert manager.latest_step() == stopped_at
  manager.close()
