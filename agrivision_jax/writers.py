"""Run outputs: metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), config.json."""

import json
import os

import jax
import ml_collections
import numpy as np
import tensorboardX


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``config`` as ``workdir/config.json`` (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


class MetricWriter:
  """Appends one JSON object per write to ``metrics.jsonl`` and mirrors the scalars to TensorBoard.

  Only process 0 writes; the other processes' writers do nothing.
  """

  def __init__(self, workdir: str):
    """Opens (appending) ``workdir/metrics.jsonl`` and a TensorBoard event file in ``workdir``."""
    self._enabled = jax.process_index() == 0
    if self._enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self._tensorboard = tensorboardX.SummaryWriter(logdir=workdir)

  def write(self, step: int, split: str, scalars: dict[str, float | str]) -> None:
    """Writes ``{'step': step, 'split': split, **scalars}``; numbers go to TensorBoard as split/name.

    Args:
      step: the number of training steps done.
      split: 'train' or 'val'.
      scalars: e.g. loss, lr, miou, iou/<class>, throughput; strings are recorded in JSON only.
    """
    if not self._enabled:
      return
    record = {'step': int(step), 'split': split}
    for name, value in scalars.items():
      record[name] = value if isinstance(value, str) else float(np.asarray(value))
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in record.items():
      if name not in ('step', 'split') and not isinstance(value, str):
        self._tensorboard.add_scalar(f'{split}/{name}', value, global_step=int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  """Returns the records of ``workdir/metrics.jsonl`` in order (FileNotFoundError if absent)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no metrics file: {path}')
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def progress_line(step: int, total_steps: int, loss: float, steps_per_second: float) -> str:
  """'step 120/400  loss 0.4312  3.21 steps/s  ETA 0:01:58' (ETA of the remaining steps)."""
  eta = int(round((total_steps - step) / max(steps_per_second, 1e-9)))
  minutes, seconds = divmod(eta, 60)
  hours, minutes = divmod(minutes, 60)
  return (f'step {step}/{total_steps}  loss {loss:.4f}  {steps_per_second:.2f} steps/s  '
          f'ETA {hours:d}:{minutes:02d}:{seconds:02d}')
