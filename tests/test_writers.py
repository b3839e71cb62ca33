"""writers: strict JSON metrics, no NaN in TensorBoard, resume truncation, config checks."""

import glob
import json
import os
import struct
import subprocess
import sys

import ml_collections
import pytest
from tensorboardX.proto import event_pb2

from agrivision_jax import progress
from agrivision_jax import writers


def _strict_loads(line: str) -> dict:
  def refuse(token):
    raise ValueError(f'non-standard JSON token {token}')
  return json.loads(line, parse_constant=refuse)


def _tensorboard_scalars(workdir: str) -> list[tuple[int, str, float]]:
  """(step, tag, value) of every scalar in the event files, read from the TFRecord framing."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      length, = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        found.append((event.step, value.tag, value.simple_value))
  return found


def test_metrics_are_strict_json_and_nan_skips_tensorboard(tmp_path):
  workdir = str(tmp_path)
  writer = writers.MetricWriter(workdir)
  writer.write(3, 'train', {'loss': 0.25, 'lr': float('nan'), 'throughput': float('inf')})
  writer.write(4, 'val', {'miou': 0.5, 'modality': 'nrgb', 'final': True})
  writer.close()
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [_strict_loads(line) for line in f]
  assert records == [
      {'step': 3, 'split': 'train', 'loss': 0.25, 'lr': None, 'throughput': None},
      {'step': 4, 'split': 'val', 'miou': 0.5, 'modality': 'nrgb', 'final': True}]
  assert writers.read_metrics(workdir) == records
  assert sorted(_tensorboard_scalars(workdir)) == [(3, 'train/loss', 0.25), (4, 'val/miou', 0.5)]
  assert writers.final_eval_done(workdir, 4)
  assert not writers.final_eval_done(workdir, 3)
  assert not writers.final_eval_done(str(tmp_path / 'none'), 4)


def test_resume_drops_later_rows_and_a_torn_line(tmp_path):
  workdir = str(tmp_path)
  writer = writers.MetricWriter(workdir)
  for step in (10, 20, 30):
    writer.write(step, 'train', {'loss': step / 100})
  writer.write(20, 'val', {'miou': 0.3})
  writer.close()
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path, 'a') as f:
    f.write('{"step": 40, "spl')   # the interrupted run died mid-write
  writer = writers.MetricWriter(workdir, resume_step=20)
  writer.write(30, 'train', {'loss': 0.31})
  writer.close()
  assert [(r['step'], r['split']) for r in writers.read_metrics(workdir)] == [
      (10, 'train'), (20, 'train'), (20, 'val'), (30, 'train')]
  assert writers.read_metrics(workdir)[-1]['loss'] == 0.31
  assert not os.path.exists(path + '.tmp')


def test_read_metrics_names_a_bad_line(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=f'{tmp_path}/metrics.jsonl:2: not a JSON object'):
    writers.read_metrics(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=f'no metrics file: {tmp_path}/x/metrics.jsonl'):
    writers.read_metrics(str(tmp_path / 'x'))


def _config(arch='resnet50', dtype='float32', modality='nrgb') -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      'model': {'arch': arch, 'dtype': dtype, 'conv_impl': 'auto', 'multi_grid': (1, 2, 4)},
      'data': {'image_size': 64, 'modality': modality, 'version': '2020', 'batch_size': 8},
      'num_train_steps': 10})


def test_config_compatibility_and_archive(tmp_path):
  workdir = str(tmp_path)
  writers.check_config_compatible(_config(), workdir)   # no config.json yet
  writers.write_config(_config(), workdir)
  writers.check_config_compatible(_config(), workdir)
  changed = _config(dtype='bfloat16')
  changed.data.batch_size = 16
  changed.model.conv_impl = 'xla'
  writers.check_config_compatible(changed, workdir)     # none of these changes the checkpoint
  with pytest.raises(writers.ConfigMismatchError) as mismatch:
    writers.check_config_compatible(_config(arch='resnet101', modality='rgb'), workdir)
  assert str(mismatch.value) == (
      f"{workdir}/config.json: the checkpoints of this workdir were trained with a different "
      "config: data.modality 'nrgb' there, 'rgb' in this config; model.arch 'resnet50' there, "
      "'resnet101' in this config. Use another --workdir, or the config of that run")
  assert os.listdir(workdir) == ['config.json']          # nothing written by the check

  writers.write_config(_config(), workdir)               # the same: no archive
  assert os.listdir(workdir) == ['config.json']
  writers.write_config(changed, workdir)
  archived, = glob.glob(os.path.join(workdir, 'config.*Z.json'))
  assert json.loads(open(archived).read())['data']['batch_size'] == 8
  assert json.loads(open(os.path.join(workdir, 'config.json')).read())['data']['batch_size'] == 16
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write('{"model": ')
  with pytest.raises(writers.ConfigMismatchError, match=f'{workdir}/config.json: not JSON'):
    writers.check_config_compatible(_config(), workdir)


def test_format_progress():
  assert progress.format_progress('predict val', 120, 400, 10.0) == (
      'predict val: 120/400 tiles  10.0 tiles/s  ETA 0:00:28')
  assert progress.format_progress('train', 120, 400, 3.2142, unit='steps',
                                  extra='loss 0.4312') == (
      'train: 120/400 steps  3.21 steps/s  ETA 0:01:27  loss 0.4312')   # 280 / 3.2142 = 87.1 s
  assert progress.format_progress('x', 5, 3605, 1.0).endswith('ETA 1:00:00')
  assert progress.format_progress('x', 0, 10, 0.0).endswith('ETA ?')


@pytest.mark.slow  # a subprocess
def test_training_imports_no_pytorch_and_pytorch_still_imports_afterwards():
  """tensorboardX alone would import PyTorch (1-2 s of every training start-up)."""
  code = ('import sys\n'
          'from agrivision_jax import train\n'
          'assert "torch" not in sys.modules, "torch imported"\n'
          'import torch\n'
          'assert torch.zeros(2).sum().item() == 0\n')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
