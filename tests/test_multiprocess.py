"""Two processes on 127.0.0.1 (2 CPU devices each, gloo collectives) train like one process with
4 devices; only process 0 logs progress."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

from agrivision_jax import data
from agrivision_jax import experiment
from agrivision_jax import writers
from step_equivalence import assert_same_step, flat, initial_variables, one_step
from two_processes import free_address, run_two_processes

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Runs train_and_evaluate in one of two processes; the config arrives as JSON.
WORKER = """
import json, sys
import jax
jax.config.update('jax_num_cpu_devices', 2)
jax.config.update('jax_default_matmul_precision', 'highest')
from absl import flags, logging
flags.FLAGS.mark_as_parsed()
logging.set_verbosity(logging.INFO)
import ml_collections
from agrivision_jax import train
config = ml_collections.ConfigDict(json.loads(sys.argv[1]))
config.model.multi_grid = tuple(config.model.multi_grid)
train.train_and_evaluate(config, sys.argv[2])
assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.devices())
"""


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tiny_config, synthetic_data_dir,
                                                           tmp_path):
  config = tiny_config(synthetic_data_dir)
  config.num_train_steps = 1
  config.checkpoint_every_steps = 1
  config.distributed = True
  workdir = str(tmp_path / 'run')
  env = {**os.environ, 'JAX_COORDINATOR_ADDRESS': free_address(), 'JAX_NUM_PROCESSES': '2',
         'PYTHONPATH': str(ROOT)}
  outputs = run_two_processes(WORKER, lambda i: [config.to_json(), workdir],
                              lambda i: {**env, 'JAX_PROCESS_ID': str(i)}, timeout=400,
                              cwd=str(ROOT))

  # One process, 4 devices, the same global batch: process p's share is rows [4p, 4p + 4).
  shares = [next(data.create_train_iterator(config.data, config.seed, p, 2)) for p in range(2)]
  batch = {key: np.concatenate([share[key] for share in shares])
           for key in experiment.BATCH_KEYS}
  loss, variables = one_step(config, jax.devices()[:4], batch)
  record, = [r for r in writers.read_metrics(workdir) if r['split'] == 'train']
  restored = flat(experiment.restore_variables(config, workdir))
  assert_same_step(record['loss'], restored, loss, variables, initial_variables(config))
  recorded = json.loads((tmp_path / 'run' / 'config.json').read_text())
  assert recorded['distributed'] is True and recorded['resolved']['process_count'] == 2
  # Progress lines come from process 0 only.
  assert 'train: 1/1 steps' in outputs[0] and 'train: 1/1 steps' not in outputs[1], outputs[1]
