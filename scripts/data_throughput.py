"""Input throughput: examples/s per CPU core for decode + augment + normalise of 512 px tiles.

  python scripts/data_throughput.py [--num_tiles=32] [--repeats=3] [--num_workers=2]
      [--steps_per_second=2,5,10] [--batch_size=32]

Generates a synthetic 512x512 Agriculture-Vision set (same files and formats as the download)
and its TFDS ArrayRecord build in a temporary folder, then times the CPU time of each stage per
example from each source on one core (one thread, in process), and finally the whole grain
train pipeline with and without worker processes. Prints how many cores one accelerator at
the given step rates and batch would need.
"""
import os
import statistics
import tempfile
import time

import ml_collections
import numpy as np
from absl import app
from absl import flags

from agrivision_jax import data
from agrivision_jax.configs import common
from agrivision_jax.data import augment
from agrivision_jax.data import pipeline
from agrivision_jax.data import prepare
from agrivision_jax.data import synthetic

_NUM_TILES = flags.DEFINE_integer('num_tiles', 32, 'synthetic 512 px train tiles')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed passes over the tiles (median reported)')
_NUM_WORKERS = flags.DEFINE_integer('num_workers', 2,
                                    'grain worker processes for the end-to-end run')
_STEPS_PER_SECOND = flags.DEFINE_list('steps_per_second', ['2', '5', '10'],
                                      'assumed accelerator train steps/s for the core estimate')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'global batch of the core estimate')
SIZE = 512


def data_config(data_dir: str, source: str, num_workers: int) -> ml_collections.ConfigDict:
  """The paper configs' config.data (augmentations on) for ``source`` at 512 px, batch 8."""
  config = common.get_config('depth=50').data
  config.update(dict(source=source, data_dir=data_dir, image_size=SIZE, batch_size=8,
                     eval_batch_size=8, num_workers=num_workers))
  config.synthetic.update(dict(num_train=_NUM_TILES.value, num_val=1, num_test=1, size=SIZE,
                               seed=0))
  return config


def time_stages(source, augment_config: ml_collections.ConfigDict) -> dict[str, float]:
  """Median CPU seconds per example of decode, augment and normalise over the repeats.

  CPU time of this (single) thread: the cost on one core, whatever else loads the machine.
  """
  rng = np.random.default_rng(0)
  stages = {'decode': [], 'augment': [], 'normalise': []}
  for _ in range(_REPEATS.value):
    totals = dict.fromkeys(stages, 0.0)
    for i in range(len(source)):
      start = time.thread_time()
      example = source[i]
      decoded = time.thread_time()
      example = augment.augment(example, augment_config, rng)
      augmented = time.thread_time()
      pipeline.batch_element(example, 'nrgb')
      normalised = time.thread_time()
      totals['decode'] += decoded - start
      totals['augment'] += augmented - decoded
      totals['normalise'] += normalised - augmented
    for key in stages:
      stages[key].append(totals[key] / len(source))
  return {key: statistics.median(values) for key, values in stages.items()}


def time_pipeline(config: ml_collections.ConfigDict, batches: int) -> float:
  """Examples/s of the grain train iterator after one warm-up batch."""
  iterator = data.create_train_iterator(config, seed=0, process_index=0, process_count=1)
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  rate = batches * config.batch_size / (time.perf_counter() - start)
  if config.num_workers:
    iterator.close()
  return rate


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    raw = os.path.join(tmp, 'raw')
    start = time.perf_counter()
    synthetic.ensure_synthetic(raw, _NUM_TILES.value, 1, 1, SIZE, seed=0)
    generation = time.perf_counter() - start
    start = time.perf_counter()
    prepare.prepare(raw, os.path.join(tmp, 'tfds'), '2020', SIZE, num_threads=1)
    build = time.perf_counter() - start
    print(f'{os.cpu_count()} CPU cores visible; {_NUM_TILES.value} synthetic {SIZE}x{SIZE} tiles: '
          f'generated in {generation:.1f} s, TFDS build {build:.1f} s (1 thread)')
    per_core = {}
    for source_name, data_dir in (('directory', raw), ('tfds', os.path.join(tmp, 'tfds'))):
      config = data_config(data_dir, source_name, 0)
      stages = time_stages(data.create_source(config, 'train'), config.augment)
      total = sum(stages.values())
      per_core[source_name] = 1 / total
      print(f'{source_name:9s} per example on one core: ' + ', '.join(
          f'{k} {v * 1e3:.1f} ms' for k, v in stages.items()) +
            f' -> {1 / total:.1f} examples/s per core')
    for source_name, data_dir in (('directory', raw), ('tfds', os.path.join(tmp, 'tfds'))):
      for workers in (0, _NUM_WORKERS.value):
        rate = time_pipeline(data_config(data_dir, source_name, workers), batches=8)
        print(f'{source_name:9s} grain train pipeline, num_workers={workers}: {rate:.1f} '
              f'examples/s on this machine')
    slowest = min(per_core.values())
    for steps_per_second in map(float, _STEPS_PER_SECOND.value):
      need = steps_per_second * _BATCH_SIZE.value
      print(f'one accelerator at {steps_per_second:g} steps/s x batch {_BATCH_SIZE.value} '
            f'consumes {need:.0f} examples/s -> {need / slowest:.1f} cores at '
            f'{slowest:.1f} examples/s per core (plus one for the training process)')


if __name__ == '__main__':
  app.run(main)
