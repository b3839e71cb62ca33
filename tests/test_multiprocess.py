"""Two processes on 127.0.0.1 (2 CPU devices each, gloo collectives) train like one process with
4 devices; only process 0 logs progress."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from agrivision_jax import data
from agrivision_jax import experiment
from agrivision_jax import losses
from agrivision_jax import optim
from agrivision_jax import train
from agrivision_jax import writers

ROOT = pathlib.Path(__file__).resolve().parents[1]


def flat(variables):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(variables))}


def relative_difference(a: dict, b: dict, reference: dict, keys: list[str]) -> float:
  """||a - b|| / ||reference|| over the leaves ``keys`` (all leaves as one vector)."""
  norm = lambda f: np.sqrt(sum(np.sum(np.square(f(k)), dtype=np.float64) for k in keys))
  return norm(lambda k: a[k] - b[k]) / norm(lambda k: reference[k])


def assert_same_step(loss: float, variables: dict, ref_loss: float, ref_variables: dict,
                     init: dict) -> None:
  """One train step on two device layouts agrees up to float32 reduction-order noise.

  The loss to 1e-5 relative, the norm statistics to 1e-4 of their norm, and the gradient
  all-reduce through the logits layer's bias (its gradient is the pixel mean of d loss / d logits,
  which depends on the forward only) to 1e-3 of its update. The whole parameter update only to
  0.25 of its norm: this width-8 network at 32 px switches a few ReLU / max-pool / Lovasz-order
  choices under 1e-7 forward noise, which moved the update by 1e-4 to 8e-2 across seeds 0-2
  (two processes against one); a missing all-reduce or per-device statistics give differences of
  order 1.
  """
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert variables.keys() == ref_variables.keys() == init.keys()
  params = [k for k in init if k.startswith("['params']")]
  stats = [k for k in init if k.startswith("['batch_stats']")]
  head = [k for k in params if "['last_conv_8']['bias']" in k]
  assert params and stats and head
  assert relative_difference(variables, ref_variables, ref_variables, stats) < 1e-4
  update = {k: ref_variables[k] - init[k] for k in params}
  assert relative_difference(ref_variables, init, init, params) > 1e-3  # the step moved them
  assert relative_difference(variables, ref_variables, update, head) < 1e-3
  assert relative_difference(variables, ref_variables, update, params) < 0.25


def initial_variables(config) -> dict:
  return flat(experiment.initial_variables(config, experiment.create_model(config)))


def one_step(config, devices, batch):
  """(loss, flat variables) after one train step of ``batch`` on ``devices``."""
  model = experiment.create_model(config)
  tx = optim.create_optimizer(config.optim)
  mesh = experiment.create_mesh(devices)
  state = experiment.create_train_state(config, model, tx, mesh)
  step = train.make_train_step(model, losses.make_loss(config.loss, mesh), tx,
                               optim.schedule(config.optim), mesh, config.seed)
  state, (metrics, _) = step(state, experiment.shard_batch(batch, mesh))
  return float(metrics.compute()['loss']), flat({'params': state.params,
                                                 'batch_stats': state.batch_stats})

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


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tiny_config, synthetic_data_dir,
                                                           tmp_path):
  config = tiny_config(synthetic_data_dir)
  config.num_train_steps = 1
  config.checkpoint_every_steps = 1
  config.distributed = True
  workdir = str(tmp_path / 'run')
  env = {**os.environ, 'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{free_port()}',
         'JAX_NUM_PROCESSES': '2', 'PYTHONPATH': str(ROOT)}
  workers = [
      subprocess.Popen([sys.executable, '-c', WORKER, config.to_json(), workdir],
                       env={**env, 'JAX_PROCESS_ID': str(i)}, cwd=str(ROOT),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = []
  for worker in workers:
    try:
      outputs.append(worker.communicate(timeout=400)[0])
    finally:
      worker.kill()
  for worker, output in zip(workers, outputs):
    assert worker.returncode == 0, output[-4000:]

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
