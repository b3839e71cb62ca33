"""grain input pipelines: sharded, shuffled, repeated, augmented, normalised, checkpointable.

Train: source -> global shuffle (reseeded every epoch) -> repeat -> augment + normalise (one
random generator per position of the global stream) -> this process's positions
(process_index::process_count) -> batch -> prefetch threads -> worker processes (each worker
makes whole batches, so batches do not depend on num_workers). Every process shuffles with the
same seed, so the processes together read each example exactly once per epoch. The iterator's
get_state()/set_state() resume the identical stream (same seed, data, process count, batch size
and num_workers).

Eval: finite; process p takes examples p, p + P, ...; every process yields the same number of
batches, the last one padded with all-invalid examples (valid False, labels 0, id '').

Batches: image float32 (b, H, W, Cin) normalised, labels uint8 (b, H, W, C) 0/1 (zero where
not valid, as in the authors' code; a quarter of float32's bytes on the host-to-device path),
valid bool (b, H, W); eval batches add id (b,) str.
"""
from __future__ import annotations

import math
from typing import Any

import grain
import ml_collections
import numpy as np

from agrivision_jax import preemption
from agrivision_jax.data import augment
from agrivision_jax.data import layout
from agrivision_jax.data import sources

RGB_MEAN, RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NIR_MEAN, NIR_STD = 0.485, 0.229
# modality -> indices into the R,G,B,NIR channels of an example image.
MODALITIES = {'nrgb': (0, 1, 2, 3), 'rgb': (0, 1, 2), 'nir': (3, 3, 3)}
_MEAN = np.array(RGB_MEAN + (NIR_MEAN,), np.float32)
_STD = np.array(RGB_STD + (NIR_STD,), np.float32)
# Batches made at once by threads of each process (or worker); PIL and numpy release the GIL.
READ_THREADS = 2


def normalize(image: np.ndarray, modality: str) -> np.ndarray:
  """(x / 255 - mean) / std per channel: ImageNet statistics for R,G,B, (0.485, 0.229) for NIR.

  Args:
    image: uint8 (..., H, W, 4) R,G,B,NIR.
    modality: 'nrgb' -> R,G,B,NIR; 'rgb' -> R,G,B; 'nir' -> NIR,NIR,NIR.
  Returns:
    float32 (..., H, W, Cin), C-contiguous (grain worker processes hand only C-contiguous arrays
    over through shared memory; others are pickled through a pipe).
  """
  channels = list(MODALITIES[modality])
  # Indexing the last axis with a list gives a channels-outermost layout, in which the arithmetic
  # runs over whole planes (3x faster than over C-order pixels of 3-4 values); then one copy to
  # C order.
  scaled = image[..., channels].astype(np.float32) * np.float32(1 / 255)
  return np.ascontiguousarray((scaled - _MEAN[channels]) / _STD[channels])


def batch_element(example: dict[str, Any], modality: str) -> dict[str, np.ndarray]:
  """Normalises an example for the model.

  Args:
    example: {'image': uint8 (H, W, 4), 'labels': uint8 (H, W, C), 'valid': bool (H, W)}.
    modality: 'nrgb', 'rgb' or 'nir'.
  Returns:
    {'image': float32 (H, W, Cin), 'labels': uint8 (H, W, C) 0/1 zeroed where not valid,
     'valid': bool (H, W)}.
  """
  valid = example['valid']
  return {'image': normalize(example['image'], modality),
          'labels': (example['labels'] * valid[..., None]).astype(np.uint8),
          'valid': valid}


class _TrainTransform(grain.transforms.RandomMap):
  """Augments (config.data.augment switches) and normalises one example; drops the id."""

  def __init__(self, augment_config: ml_collections.ConfigDict, modality: str):
    self._augment_config = augment_config
    self._modality = modality

  def random_map(self, element: dict[str, Any], rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
    return batch_element(augment.augment(element, self._augment_config, rng), self._modality)


class _EvalElement(grain.transforms.Map):
  """Maps a position of this process's eval stream to a normalised example or a padding one."""

  def __init__(self, source: Any, process_index: int, process_count: int, modality: str,
               image_size: int, num_classes: int):
    self._source = source
    self._process_index, self._process_count = process_index, process_count
    self._modality = modality
    self._image_size, self._num_classes = image_size, num_classes

  def map(self, element: int) -> dict[str, np.ndarray]:
    index = self._process_index + element * self._process_count
    if index < len(self._source):
      example = self._source[index]
    else:
      size = self._image_size
      example = {'image': np.zeros((size, size, 4), np.uint8),
                 'labels': np.zeros((size, size, self._num_classes), np.uint8),
                 'valid': np.zeros((size, size), bool), 'id': ''}
    return {**batch_element(example, self._modality), 'id': example['id']}


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in [0, {process_count})')


def _prefetch(batches: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  """Threads (READ_THREADS batches at once per process or worker), then worker processes."""
  iter_dataset = batches.to_iter_dataset(
      grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_THREADS))
  if num_workers:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                                            worker_init_fn=preemption.worker_init)
  return iter_dataset


def create_train_iterator(data_config: ml_collections.ConfigDict, seed: int, process_index: int,
                          process_count: int) -> grain.DatasetIterator:
  """Endless, checkpointable iterator of this process's training batches.

  Args:
    data_config: config.data (source, data_dir, version, modality, image_size, batch_size
      (global), num_workers, on_bad_example, augment, synthetic), as checked by
      agrivision_jax.configuration.validate (batch_size a multiple of process_count).
    seed: shuffle and augmentation seed, in [0, 2**32).
    process_index, process_count: this process and the number of processes.
  Returns:
    grain DatasetIterator (get_state()/set_state()) of {'image': float32 (b, H, W, Cin),
    'labels': uint8 (b, H, W, C), 'valid': bool (b, H, W)}, b = batch_size // process_count.
  """
  _check_process(process_index, process_count)
  batch_size = data_config.batch_size // process_count
  source = sources.create_source(data_config, 'train')
  dataset = (grain.MapDataset.source(source).seed(seed).shuffle().repeat()
             .random_map(_TrainTransform(data_config.augment, data_config.modality)))
  batches = dataset[process_index::process_count].batch(batch_size, drop_remainder=True)
  return iter(_prefetch(batches, data_config.num_workers))


def create_eval_iterator(data_config: ml_collections.ConfigDict, split: str, process_index: int,
                         process_count: int) -> grain.IterDataset:
  """Finite, re-iterable dataset of this process's eval batches covering its share of the split.

  Args:
    data_config: config.data (eval_batch_size global).
    split: 'train', 'val' or 'test'.
    process_index, process_count: this process and the number of processes.
  Returns:
    grain IterDataset of {'image': float32 (b, H, W, Cin), 'labels': uint8 (b, H, W, C),
    'valid': bool (b, H, W), 'id': str (b,)}, b = eval_batch_size // process_count; every
    process yields ceil(ceil(N / P) / b) batches; padding examples have valid False and id ''.
  """
  _check_process(process_index, process_count)
  batch_size = data_config.eval_batch_size // process_count
  source = sources.create_source(data_config, split)
  per_process = math.ceil(len(source) / process_count)
  count = math.ceil(per_process / batch_size) * batch_size
  element = _EvalElement(source, process_index, process_count, data_config.modality,
                         data_config.image_size, len(layout.class_names(data_config.version)))
  batches = grain.MapDataset.range(count).map(element).batch(batch_size)
  return _prefetch(batches, data_config.num_workers)
