"""scripts/paper_tables.py on fabricated workdirs (config.json + metrics.jsonl written here)."""
import json
import os
import subprocess
import sys

import pytest

# Every test runs the script as a subprocess.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'scripts', 'paper_tables.py')


def _workdir(root, name, arch, ibn_mode, lambdas, modality, val_rows, width=64):
  workdir = root / name
  workdir.mkdir()
  config = {'model': {'arch': arch, 'ibn_mode': ibn_mode, 'width': width},
            'loss': {'lambda_dice': lambdas[0], 'lambda_lovasz': lambdas[1]},
            'data': {'modality': modality, 'image_size': 512, 'batch_size': 32,
                     'source': 'directory'},
            'num_train_steps': 25000}
  (workdir / 'config.json').write_text(json.dumps(config))
  lines = [{'step': 100, 'split': 'train', 'loss': 0.3, 'miou': 0.99}]
  lines += [{'split': 'val', **row} for row in val_rows]
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in lines))
  return str(workdir)


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                        timeout=60, check=False)


def _cells(stdout, row, workdir):
  """{column: cell} of the table line of ``row`` for ``workdir`` (one per table)."""
  found = []
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if len(cells) == 8 and cells[0] == row and cells[6] == workdir:
      found.append(dict(zip(('row', 'model', 'ours', 'paper', 'diff', 'step', 'workdir',
                             'setup'), cells)))
  return found


def test_tables_best_and_final(tmp_path):
  s101 = _workdir(tmp_path, 's101', 'resnet101', 's', (1, 0), 'nrgb', [
      {'step': 1000, 'miou': 0.40, 'modality': 'nrgb'},
      {'step': 2000, 'miou': 0.52, 'modality': 'nrgb'},
      {'step': 3000, 'miou': 0.51, 'modality': 'nrgb'},
      {'step': 3000, 'miou': 0.90, 'modality': 'nrgb', 'process': 1}])  # not process 0
  a101 = _workdir(tmp_path, 'a101', 'resnet101', 'a', (1, 0), 'nrgb', [
      {'step': 500, 'miou': 0.5}])  # no 'modality' key: the training modality
  hybrid = _workdir(tmp_path, 'a101_hybrid', 'resnet101', 'a', (1, 1), 'nrgb', [
      {'step': 800, 'miou': 0.53, 'best_miou': 0.55, 'modality': 'nrgb'},
      {'step': 900, 'miou': 0.52, 'best_miou': 0.55, 'modality': 'nrgb'}])
  rgb = _workdir(tmp_path, 'r101_rgb', 'resnet101', 'none', (1, 0), 'rgb', [
      {'step': 700, 'miou': 0.45, 'modality': 'rgb'},
      {'step': 700, 'miou': 0.20, 'modality': 'nir'}], width=8)
  other = _workdir(tmp_path, 'ab50', 'resnet50', 'ab', (1, 0), 'nrgb', [
      {'step': 1, 'miou': 0.1, 'modality': 'nrgb'}])
  empty = _workdir(tmp_path, 'empty', 'resnet50', 's', (1, 0), 'nrgb', [])

  result = _run(s101, a101, hybrid, rgb, other, empty)
  assert result.returncode == 0, result.stderr
  out = result.stdout
  [row] = _cells(out, 'IBN-Net101-s', s101)
  assert (row['ours'], row['paper'], row['diff'], row['step']) == ('52.00', '51.46', '+0.54',
                                                                   '2000')
  assert row['setup'] == '-'
  rows = _cells(out, 'IBN-Net101-a', a101) + _cells(out, '(1, 0)', a101)
  assert [(r['ours'], r['paper'], r['diff']) for r in rows] == [
      ('50.00', '50.35', '-0.35'), ('50.00', '50.35', '-0.35')]  # Tables 2 and 3
  [row] = _cells(out, '(1, 1)', hybrid)
  assert (row['ours'], row['paper'], row['diff']) == ('55.00', '53.52', '+1.48')
  [row] = _cells(out, 'RGB -> RGB', rgb)
  assert (row['ours'], row['paper'], row['diff'], row['setup']) == ('45.00', '46.05', '-1.05',
                                                                    'width 8')
  [row] = _cells(out, 'RGB -> NIR', rgb)
  assert (row['ours'], row['paper'], row['diff']) == ('20.00', '18.29', '+1.71')
  assert out.index('Table 1') < out.index('Table 2') < out.index('Table 3')
  assert f'{other}: IBN-Net50-ab, trained on nrgb' in out and 'no paper row' in out
  assert f'{empty}: no val rows in metrics.jsonl' in out

  result = _run(s101, hybrid, '--select=final', f'--out={tmp_path / "t.md"}')
  assert result.returncode == 0, result.stderr
  [row] = _cells(result.stdout, 'IBN-Net101-s', s101)
  assert (row['ours'], row['diff'], row['step']) == ('51.00', '-0.46', '3000')
  [row] = _cells(result.stdout, '(1, 1)', hybrid)
  assert (row['ours'], row['diff']) == ('52.00', '-1.52')
  assert (tmp_path / 't.md').read_text() == result.stdout
  record = json.loads((tmp_path / 't.json').read_text())
  assert record['select'] == 'final' and len(record['entries']) == 2


def test_bad_workdirs_are_one_line_errors(tmp_path):
  result = _run(str(tmp_path / 'nowhere'))
  assert result.returncode != 0
  assert f'{tmp_path / "nowhere" / "config.json"}: no config.json' in result.stderr
  bad = _workdir(tmp_path, 'bad', 'resnet50', 's', (1, 0), 'nrgb', [{'step': 1, 'miou': 0.1}])
  with open(os.path.join(bad, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 2, "split": "val", "miou": \n')
  result = _run(bad)
  assert result.returncode != 0
  assert f'{os.path.join(bad, "metrics.jsonl")}:3: not JSON' in result.stderr
  (tmp_path / 'bad' / 'config.json').write_text(json.dumps({'model': {'arch': 'resnet50'}}))
  result = _run(bad)
  assert 'config.json: no model.ibn_mode' in result.stderr
