"""Run outputs: metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), config.json.

Only process 0 writes. ``metrics.jsonl`` is strict JSON, one object per line: a NaN or infinite
value is written as null and never sent to TensorBoard. Workdirs may be local paths or URLs
(gs://...; ``etils.epath``); there ``metrics.jsonl`` is rewritten whole at each write, as object
stores cannot append.
"""

import datetime
import json
import math
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from agrivision_jax import workdir as workdir_lib


def _import_tensorboardx():
  """tensorboardX, imported without PyTorch where PyTorch is installed but not yet imported.

  tensorboardX's writer imports torch (1-2 s at start-up) only to recognise torch tensors, and
  this module passes it Python floats. A ``None`` entry in ``sys.modules`` makes that import fail
  fast; it is removed again, so a later ``import torch`` works as usual.
  """
  block = 'torch' not in sys.modules
  if block:
    sys.modules['torch'] = None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if block:
      del sys.modules['torch']
  return tensorboardX


tensorboardX = _import_tensorboardx()

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'
# model.* fields that leave the checkpoint contents as they are (compute dtype, conv kernels).
_FREE_MODEL_FIELDS = ('model.dtype', 'model.conv_impl')
_DATA_FIELDS = ('data.image_size', 'data.modality', 'data.version')


class ConfigMismatchError(ValueError):
  """The config differs from the workdir's config.json in a field the checkpoints depend on."""


def _is_url(path: epath.Path) -> bool:
  return '://' in str(path)


def _write_atomic(path: epath.Path, text: str) -> None:
  """Writes ``path`` through a temporary file and a rename (atomic on local filesystems)."""
  temporary = path.with_name(path.name + '.tmp')
  temporary.write_text(text)
  temporary.replace(path)


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def check_config_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises when ``config`` cannot continue the run in ``workdir`` (call before writing anything).

  Compared: every ``model.*`` field except dtype and conv_impl, and data.image_size / modality /
  version, against ``workdir/config.json``. A field present on one side only (added or removed
  by a newer version of the code) is not compared. No config.json: nothing to compare.

  Raises:
    ConfigMismatchError: one line, 'W/config.json: model.arch 'resnet50' there, 'resnet101' in
      this config; ...'.
  """
  path = workdir_lib.path(workdir) / CONFIG_FILE
  if not path.exists():
    return
  try:
    saved = _flatten(json.loads(path.read_text()))
  except json.JSONDecodeError as error:
    raise ConfigMismatchError(f'{path}: not JSON ({error}); move it away to start over') from None
  current = _flatten(_config_dict(config))
  differ = [
      f'{key} {saved[key]!r} there, {current[key]!r} in this config'
      for key in sorted(set(saved) & set(current))
      if (key.startswith('model.') and key not in _FREE_MODEL_FIELDS or key in _DATA_FIELDS)
      and saved[key] != current[key]]
  if differ:
    raise ConfigMismatchError(
        f'{path}: the checkpoints of this workdir were trained with a different config: '
        f'{"; ".join(differ)}. Use another --workdir, or the config of that run')


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``config`` as ``workdir/config.json`` (process 0 only; atomic).

  Call it after a successful restore or initialisation. A previous config.json that differs is
  kept as ``config.<UTC time, e.g. 20261202T062900Z>.json``.
  """
  if jax.process_index() != 0:
    return
  directory = workdir_lib.path(workdir)
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / CONFIG_FILE
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if path.exists():
    previous = path.read_text()
    if previous == text:
      return
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S%fZ')
    archive = directory / f'config.{stamp}.json'
    archive.write_text(previous)
    logging.info('%s differs from this config: the previous one is kept as %s', path, archive)
  _write_atomic(path, text)


def _json_value(value: Any) -> Any:
  """A JSON-safe scalar: str and bool as they are, numbers as float, NaN / inf as None."""
  if isinstance(value, (str, bool)) or value is None:
    return value
  number = float(np.asarray(value))
  return number if math.isfinite(number) else None


def _parse_lines(path: epath.Path, text: str, drop_torn_last: bool) -> list[tuple[str, dict]]:
  """(line, record) of each non-empty line; a bad line raises, naming ``path`` and its number."""
  lines = [l for l in text.splitlines() if l.strip()]
  parsed = []
  for number, line in enumerate(lines, 1):
    try:
      parsed.append((line, json.loads(line)))
    except json.JSONDecodeError as error:
      if drop_torn_last and number == len(lines) and not text.endswith('\n'):
        logging.warning('%s: dropping its last line, cut off mid-write: %r', path, line[:80])
        break
      raise ValueError(f'{path}:{number}: not a JSON object ({error})') from None
  return parsed


class MetricWriter:
  """Appends one JSON object per write to ``metrics.jsonl`` and mirrors numbers to TensorBoard.

  Only process 0 writes; the other processes' writers do nothing.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    """Opens ``workdir/metrics.jsonl`` and a TensorBoard event file in ``workdir``.

    Args:
      workdir: the run's directory (local or gs://).
      resume_step: the step training resumes from: rows of a later step (written after that
        checkpoint by the interrupted run) are dropped, by an atomic rewrite, and TensorBoard
        discards its events after it (``purge_step``). None keeps every row.
    """
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    directory = workdir_lib.path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    self._path = directory / METRICS_FILE
    self._url = _is_url(directory)
    text = self._path.read_text() if self._path.exists() else ''
    parsed = _parse_lines(self._path, text, drop_torn_last=True)
    rows = [line for line, record in parsed
            if resume_step is None or record.get('step', 0) <= resume_step]
    if len(rows) < len(parsed):
      logging.info('%s: dropping %d rows after the resumed step %d', self._path,
                   len(parsed) - len(rows), resume_step)
    lines = [line for line in text.splitlines() if line.strip()]
    if text and (rows != lines or not text.endswith('\n')):
      _write_atomic(self._path, ''.join(row + '\n' for row in rows))
    self._rows = rows if self._url else None
    self._file = None if self._url else self._path.open('a')
    self._tensorboard = tensorboardX.SummaryWriter(
        logdir=str(directory), purge_step=None if resume_step is None else resume_step + 1)

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    """Writes ``{'step': step, 'split': split, **scalars}``; finite numbers go to TensorBoard.

    Args:
      step: the number of training steps done.
      split: 'train' or 'val' (or 'test').
      scalars: e.g. loss, lr, miou, iou/<class>, throughput (numbers, NaN / inf written as
        null); strings and bools (e.g. 'final': True) are recorded in JSON only.
    """
    if not self._enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({name: _json_value(value) for name, value in scalars.items()})
    line = json.dumps(record, allow_nan=False)
    if self._url:
      self._rows.append(line)
      _write_atomic(self._path, ''.join(row + '\n' for row in self._rows))
    else:
      self._file.write(line + '\n')
      self._file.flush()
    for name, value in record.items():
      if name not in ('step', 'split') and isinstance(value, float):
        self._tensorboard.add_scalar(f'{split}/{name}', value, global_step=int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._enabled:
      if self._file is not None:
        self._file.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  """Returns the records of ``workdir/metrics.jsonl`` in order.

  Raises:
    FileNotFoundError: naming the file when it is absent.
    ValueError: a line that is not JSON, naming the file and line number.
  """
  path = workdir_lib.path(workdir) / METRICS_FILE
  if not path.exists():
    raise FileNotFoundError(f'no metrics file: {path}')
  return [record for _, record in _parse_lines(path, path.read_text(), drop_torn_last=False)]


def final_eval_done(workdir: str, step: int) -> bool:
  """True when ``metrics.jsonl`` holds the final 'val' row (``'final': True``) of ``step``."""
  path = workdir_lib.path(workdir) / METRICS_FILE
  if not path.exists():
    return False
  return any(r.get('split') == 'val' and r.get('step') == step and r.get('final') is True
             for r in read_metrics(workdir))
