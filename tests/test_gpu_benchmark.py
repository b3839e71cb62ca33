"""scripts/gpu_benchmark.py --smoke: the whole script on CPU at a tiny size (no timing asserted).

grain, tensorflow_datasets, tensorboardX and safetensors are made unimportable for the script and
its PyTorch child, as on a bare GPU image that has only jax, flax, optax, orbax, torch and
ml_collections.
"""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ('grain', 'tensorflow_datasets', 'tensorboardX', 'safetensors')
TIMED_FIELDS = ('compile_s', 'step_ms_median', 'step_ms_p90', 'images_per_s', 'peak_gb',
                'tflop_per_step', 'mfu')


def _positive(row, field):
  value = row[field]
  assert isinstance(value, float) and math.isfinite(value) and value > 0, (row['label'], field)


@pytest.mark.slow
def test_smoke_runs_every_part_and_reports_finite_figures(tmp_path):
  for name in BLOCKED:
    (tmp_path / 'blocked' / name).mkdir(parents=True)
    (tmp_path / 'blocked' / name / '__init__.py').write_text(
        f'raise ImportError("{name} is not on a bare GPU image")\n')
  out = tmp_path / 'out'
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(tmp_path / 'blocked'), REPO]),
         'JAX_PLATFORMS': 'cpu', 'OUT': str(out)}
  result = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'gpu_benchmark.py'),
                           '--smoke'], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report['settings']['smoke'] and report['backend'] == 'cpu'
  assert report['torch_tf32'] == {'matmul': True, 'cudnn': True}
  rows = {row['label']: row for row in report['rows']}
  assert set(rows) == {'jax bfloat16 xla b2', 'torch bfloat16 b2'}
  for row in rows.values():
    assert 'error' not in row and 'skipped' not in row, row
    for field in TIMED_FIELDS:
      _positive(row, field)
    assert len(row['step_times_ms']) == 2
    assert row['step_ms_p90'] >= row['step_ms_median']
  jax_row = rows['jax bfloat16 xla b2']
  for field in ('lovasz_share', 'jax_over_torch', 'final_loss'):
    _positive(jax_row, field)
  assert jax_row['conv_impl_resolved'] == 'xla'
  # the ratio and the peer's MFU follow from the two rows' own figures
  torch_row = rows['torch bfloat16 b2']
  assert math.isclose(jax_row['jax_over_torch'],
                      jax_row['step_ms_median'] / torch_row['step_ms_median'])
  assert math.isclose(torch_row['mfu'] * torch_row['step_ms_median'],
                      jax_row['mfu'] * jax_row['step_ms_median'])
  assert math.isclose(jax_row['mfu'], jax_row['tflop_per_step'] * 1e3
                      / jax_row['step_ms_median'] / 989.0)
  lovasz = report['loss_ms']['2']['lovasz_ms']
  assert math.isclose(jax_row['lovasz_share'], lovasz / jax_row['step_ms_median'])
  assert json.loads((out / 'gpu_benchmark.json').read_text()) == report
  table = (out / 'gpu_benchmark.txt').read_text()
  assert table.splitlines()[0].split()[:3] == ['row', 'compile', 's']
  assert 'jax bfloat16 xla b2' in table and 'torch bfloat16 b2' in table
