"""Real training processes (``python -m agrivision_jax.main``) that are signalled, killed, run twice
on one workdir or restarted with another model; a run interrupted in every way, rerun each time,
ends bit-identical to an uninterrupted one. Slow (a few small training subprocesses):
``pytest -m slow``.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from agrivision_jax import experiment
from agrivision_jax import writers
from agrivision_jax.configs import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
TIMING_FIELDS = ('steps_per_second', 'throughput')

pytestmark = pytest.mark.slow


def overrides(data_dir: str) -> list[str]:
  """A width-8 ResNet-20 on 32 px synthetic tiles: 8 steps, validation and checkpoint every 4."""
  return [
      '--config=configs/resnet.py:depth=20,demo', '--config.model.width=8',
      '--config.model.aspp_channels=16', '--config.model.decoder_channels=16',
      '--config.model.low_level_channels=8', '--config.data.image_size=32',
      '--config.data.synthetic.size=32', '--config.data.synthetic.num_train=24',
      '--config.data.synthetic.num_val=6', '--config.data.synthetic.num_test=3',
      f'--config.data.data_dir={data_dir}', f'--config.num_train_steps={STEPS}',
      '--config.log_every_steps=1', '--config.eval_every_steps=4',
      '--config.checkpoint_every_steps=4']


def in_process_config(data_dir: str):
  """The config ``overrides`` gives (for restoring the workdirs here)."""
  config = common.get_config('depth=20,demo')
  config.model.update(dict(width=8, aspp_channels=16, decoder_channels=16, low_level_channels=8))
  config.data.update(dict(image_size=32, data_dir=data_dir))
  config.data.synthetic.update(dict(size=32, num_train=24, num_val=6, num_test=3))
  return config


@pytest.fixture(scope='module')
def setup(tmp_path_factory, synthetic_data_dir):
  """(data_dir, compilation cache dir, the workdir of an uninterrupted run).

  The shared synthetic dataset (conftest.py) is generated before any subprocess reads it."""
  root = tmp_path_factory.mktemp('reliability')
  data_dir, cache = synthetic_data_dir, str(root / 'cache')
  reference = str(root / 'reference')
  process = start(data_dir, cache, reference)
  assert finish(process) == 0, process.log[-3000:]
  return data_dir, cache, reference


def start(data_dir: str, cache: str, workdir: str, *extra: str) -> subprocess.Popen:
  command = [sys.executable, '-m', 'agrivision_jax.main', *overrides(data_dir), *extra,
             f'--workdir={workdir}', f'--compilation_cache_dir={cache}']
  process = subprocess.Popen(command, cwd=str(ROOT), env={**os.environ, 'PYTHONPATH': str(ROOT)},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  process.log = ''
  return process


def read_until(process: subprocess.Popen, marker: str) -> None:
  """Reads the process's stderr until a line holds ``marker`` (AssertionError at its end)."""
  for line in process.stderr:
    process.log += line
    if marker in line:
      return
  raise AssertionError(f'{marker!r} never logged:\n{process.log[-3000:]}')


def finish(process: subprocess.Popen) -> int:
  process.log += process.stderr.read()
  return process.wait(timeout=600)


def results(config, workdir: str) -> tuple[list[dict], dict]:
  """(metric rows without timings, the final checkpoint's variables)."""
  rows = [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
          for r in writers.read_metrics(workdir)]
  variables, step = experiment.restore_variables_and_step(config, workdir)
  assert step == STEPS
  return rows, {k: np.asarray(v) for k, v in
                jax.tree_util.tree_leaves_with_path(variables)}


def assert_same_run(config, workdir: str, reference: str):
  """Same metric rows (log_every_steps=1: no partial log interval) and final variables."""
  rows, variables = results(config, workdir)
  reference_rows, reference_variables = results(config, reference)
  assert rows == reference_rows
  assert variables.keys() == reference_variables.keys()
  for key in variables:
    np.testing.assert_array_equal(variables[key], reference_variables[key], err_msg=str(key))


def assert_stopped_by_signal(process: subprocess.Popen, signum: int) -> None:
  """Exit status 128 + signum and a last line that says how to resume, without a traceback."""
  assert finish(process) == 128 + signum, process.log[-3000:]
  last = process.log.strip().splitlines()[-1]
  assert 'stopped by a signal after step' in last and 'run the same command to resume' in last
  assert 'Traceback' not in process.log


def test_every_interruption_resumes_to_the_uninterrupted_run(setup, tmp_path):
  """One workdir through every way a run can end early, each rerun resuming the last: SIGTERM
  (while a second run on the same workdir is refused), SIGINT, two SIGTERMs at once, SIGKILL
  during the final validation; the last rerun completes the final validation and ends
  bit-identical to the uninterrupted reference. Each rerun is signalled at its first train step
  (which step that is depends on how far the run before it got)."""
  data_dir, cache, reference = setup
  workdir = str(tmp_path)

  first = start(data_dir, cache, workdir)
  try:
    read_until(first, 'train: 1/')
    first.send_signal(signal.SIGSTOP)  # holds it (and the workdir's lock) mid-training
    second = start(data_dir, cache, workdir)
    assert finish(second) == 1
    assert second.log.strip().splitlines()[-1].startswith(
        f'agrivision_jax.main: error: workdir {workdir} is in use by pid {first.pid}')
    first.send_signal(signal.SIGTERM)  # delivered when it continues
    first.send_signal(signal.SIGCONT)
    assert_stopped_by_signal(first, signal.SIGTERM)
  finally:
    first.kill()  # nothing once it has exited; a failed check above must not leave it stopped

  rerun = start(data_dir, cache, workdir)
  read_until(rerun, 'train: ')
  rerun.send_signal(signal.SIGINT)
  assert_stopped_by_signal(rerun, signal.SIGINT)

  rerun = start(data_dir, cache, workdir)
  read_until(rerun, 'train: ')
  rerun.send_signal(signal.SIGTERM)  # the second signal exits at once
  rerun.send_signal(signal.SIGTERM)
  assert finish(rerun) in (-signal.SIGTERM, 128 + signal.SIGTERM), rerun.log[-3000:]

  rerun = start(data_dir, cache, workdir)
  read_until(rerun, f'train: {STEPS}/{STEPS} steps')
  rerun.kill()
  finish(rerun)

  rerun = start(data_dir, cache, workdir)
  assert finish(rerun) == 0, rerun.log[-3000:]
  assert_same_run(in_process_config(data_dir), workdir, reference)
  assert writers.final_eval_done(workdir, STEPS)


def test_a_different_model_is_refused_with_a_one_line_diff(setup):
  data_dir, cache, reference = setup
  before = pathlib.Path(reference, 'config.json').read_bytes()
  process = start(data_dir, cache, reference, '--config.model.width=16',
                  f'--config.num_train_steps={2 * STEPS}')
  assert finish(process) == 1
  last = process.log.strip().splitlines()[-1]
  assert last.startswith('agrivision_jax.main: error: ') and 'model.width' in last, last
  assert 'Traceback' not in process.log
  assert pathlib.Path(reference, 'config.json').read_bytes() == before
  assert json.loads(before)['model']['width'] == 8
