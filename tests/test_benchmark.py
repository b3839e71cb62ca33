"""scripts/benchmark.py: its command line, the JSON it prints and its collective count (no timing
assertions; the benchmark itself is a script)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'benchmark.py')
ENV = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'AGRIVISION_CPU_XLA_FLAGS': '0', 'PYTHONPATH': REPO}


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, env=ENV, capture_output=True,
                        text=True, timeout=600, check=False)


@pytest.mark.slow
def test_rejects_bad_arguments_before_any_compute():
  result = _run('--config=configs/ibn_s.py:depth=20,demo', '--steps=0')
  assert result.returncode != 0
  assert '--steps must be >= 1, got 0' in result.stderr
  result = _run('--config=configs/ibn_s.py:demo', '--peer=tensorflow')
  assert result.returncode != 0
  assert 'flag --peer=tensorflow: value should be one of <|torch>' in result.stderr
  result = _run('--config=configs/ibn_s.py:depth=20,demo', '--cpu_devices=3')
  assert result.returncode != 0
  assert 'config.data.batch_size=8 must be divisible by the number of devices (3)' in (
      result.stderr)


# A shard_map function over 8 CPU devices with a known set of collectives, each depending on the
# previous one (so that no XLA pass merges or removes them): 2 psums -> all-reduce,
# all_gather, psum_scatter -> reduce-scatter, ppermute -> collective-permute, all_to_all.
_HAND_BUILT = """
import importlib, json, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
sys.path.insert(0, sys.argv[1])
benchmark = importlib.import_module('benchmark')
jax.config.update('jax_num_cpu_devices', 8)
mesh = jax.make_mesh((8,), ('data',))

def body(x):
  a = jax.lax.psum(x, 'data')
  b = jax.lax.psum(jnp.sin(a) * x, 'data')
  g = jax.lax.all_gather(b * x, 'data', tiled=True)
  s = jax.lax.psum_scatter(g, 'data', tiled=True)
  p = jax.lax.ppermute(s, 'data', [(i, (i + 1) % 8) for i in range(8)])
  t = jax.lax.all_to_all(p.reshape(8, -1), 'data', 0, 0, tiled=True)
  return t.reshape(x.shape)

x = jax.device_put(jnp.ones((64, 3)), NamedSharding(mesh, P('data')))
sharded = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P('data'), out_specs=P('data')))
local = jax.jit(lambda x: jnp.sin(x) * 2)
print(json.dumps({'sharded': benchmark.count_collectives(sharded.lower(x).compile().as_text()),
                  'local': benchmark.count_collectives(local.lower(x).compile().as_text())}))
"""


@pytest.mark.slow
def test_count_collectives_of_a_hand_built_sharded_function():
  result = subprocess.run([sys.executable, '-c', _HAND_BUILT, os.path.dirname(SCRIPT)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  counts = json.loads(result.stdout.strip().splitlines()[-1])
  assert counts['sharded'] == {
      'all-reduce': 2, 'all-gather': 1, 'reduce-scatter': 1, 'all-to-all': 1,
      'ragged-all-to-all': 0, 'collective-permute': 1, 'collective-broadcast': 0}
  assert set(counts['local'].values()) == {0}


@pytest.mark.slow
def test_tiny_train_step_on_8_cpu_devices_reports_collectives_and_conv_impl():
  """The real sharded train step of a width-8 IBN-s model on 8 CPU devices: its synchronised
  norm statistics and gradients need all-reduces; the JSON names the resolved conv_impl."""
  result = _run('--config=configs/ibn_s.py:depth=20,demo', '--cpu_devices=8', '--steps=1',
                '--eval_steps=0', '--pipeline_batches=0', '--config.data.image_size=32')
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['device_count'] == 8 and report['conv_impl'] == 'cpu_gemm'
  assert report['collectives']['all-reduce'] >= 1
  assert set(report['collectives']) >= {'all-reduce', 'all-gather', 'reduce-scatter',
                                        'all-to-all', 'collective-permute'}
  assert 'train step collectives: all-reduce' in result.stdout
