"""Prediction: test-time augmentation, challenge submission PNGs, overlays, and the official mIoU.

``--mode=predict`` streams ``config.predict.split`` (train, val, or the unlabelled test split)
through the workdir's model and writes, per tile, ``<workdir>/predictions/<split>/<id>.png``: a
single-channel uint8 PNG of the argmax class index (0..C-1) of the TTA-averaged logits, the
Agriculture-Vision challenge submission format. The first ``num_overlays`` tiles also get an
RGB | NIR | ground truth | prediction figure in ``<workdir>/predictions/<split>_overlays/``. On a
labelled split the official challenge mIoU of exactly these predictions is logged, printed and
saved as ``<workdir>/predictions/<split>_tta_<mode>.json``, so TTA gains read off directly.

Memory stays flat: one batch is in flight on the device while the previous one is written.

The workdir may be a URL (gs://...): every output is written through ``etils.epath``. With several
processes each writes the PNGs of its own tiles; the overlays and the JSON come from process 0.
"""

import functools
import json
import math
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from agrivision_jax import data as data_lib
from agrivision_jax import experiment
from agrivision_jax import metrics as metrics_lib
from agrivision_jax import overlay
from agrivision_jax import tta as tta_lib
from agrivision_jax import workdir as workdir_lib
from agrivision_jax.data import layout
from agrivision_jax.progress import Progress


@functools.lru_cache(maxsize=8)
def _step_functions(model: nn.Module, mesh: jax.sharding.Mesh) -> tuple[Callable, Callable]:
  """Jitted ``forward(variables, images) -> logits`` and ``finish(logits, labels, valid) ->
  (argmax (B, H, W) uint8 split over 'data', confusion (C, C) int32 replicated)``; cached so that
  repeated passes with the same model and shapes compile once."""
  data, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
  forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False),
                    in_shardings=(replicated, data), out_shardings=data)

  def finish(logits, labels, valid):
    prediction = jnp.argmax(logits, axis=-1).astype(jnp.uint8)
    return prediction, metrics_lib.confusion_matrix(logits, labels, valid)

  return forward, jax.jit(finish, in_shardings=(data, data, data),
                          out_shardings=(data, replicated))


def predict_batches(model: nn.Module, variables: Mapping[str, Any],
                    batches: Iterable[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh,
                    tta: str) -> Iterable[tuple[Mapping[str, np.ndarray], np.ndarray, np.ndarray]]:
  """Predicts every batch with test-time augmentation, one batch ahead of the consumer.

  Args:
    model, variables: the network and its {'params', 'batch_stats'} (replicated over ``mesh``).
    batches: this process's batches {'image': (b, H, W, Cin) float32 normalised, 'labels':
      (b, H, W, C) float32 (zeros on an unlabelled split), 'valid': (b, H, W) bool, 'id': (b,)
      str ('' = padding)}; b * process_count must be divisible by the mesh size.
    mesh: 1-D 'data' mesh.
    tta: 'none' | 'flips' | 'd4' (``agrivision_jax.tta``).

  Yields:
    (batch, prediction (b, H, W) uint8 class indices of this process's examples, confusion
    (C, C) int64 of the whole global batch under the official rule).
  """
  tta_lib.transforms_for(tta)
  forward, finish = _step_functions(model, mesh)
  data = NamedSharding(mesh, P('data'))
  pending = None
  for batch in batches:
    arrays = [jax.make_array_from_process_local_data(data, np.asarray(batch[key]))
              for key in ('image', 'labels', 'valid')]
    logits = tta_lib.tta_logits(functools.partial(forward, variables), arrays[0], tta)
    dispatched = (batch, *finish(logits, arrays[1], arrays[2]))
    if pending is not None:
      yield _fetch(pending, mesh)
    pending = dispatched
  if pending is not None:
    yield _fetch(pending, mesh)


def _fetch(dispatched: tuple, mesh: jax.sharding.Mesh
           ) -> tuple[Mapping[str, np.ndarray], np.ndarray, np.ndarray]:
  """Waits for a dispatched batch; returns this process's rows of the prediction."""
  batch, prediction, confusion = dispatched
  local = multihost_utils.global_array_to_host_local_array(prediction, mesh, P('data'))
  return batch, np.asarray(local), np.asarray(confusion, np.int64)


def write_predictions(results: Iterable[tuple[Mapping[str, np.ndarray], np.ndarray, np.ndarray]],
                      out_dir: str | os.PathLike, class_names: Sequence[str], *, labelled: bool,
                      overlay_dir: str | os.PathLike = '', num_overlays: int = 0,
                      overlay_image: Callable[[int], Mapping[str, Any]] | None = None,
                      progress: Callable[[int], None] = lambda count: None) -> dict[str, float]:
  """Writes one ``<id>.png`` per tile, overlays of the first tiles, and accumulates the mIoU.

  Args:
    results: from ``predict_batches``.
    out_dir: folder for the index PNGs (created), a local path or a URL.
    class_names: the C class names (legend of the overlays, metric names).
    labelled: the split has labels: accumulate the official confusion matrix.
    overlay_dir: folder for the overlay figures (created when num_overlays > 0), local or a URL.
    num_overlays: number of tiles, in order, that get an overlay.
    overlay_image: k -> the k-th tile's source example ({'image': uint8 (H, W, 4) R,G,B,NIR,
      'labels', 'valid', 'id'}), for the overlay's raw pictures.
    progress: called with the number of tiles written from each batch.

  Returns:
    {'num_tiles'} plus, when labelled, {'miou', 'iou/<class>'} of the written predictions.
  """
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  overlay_dir = epath.Path(overlay_dir)   # save_overlay creates it with the first overlay
  metric = metrics_lib.ConfusionMetric(num_classes=len(class_names),
                                       class_names=tuple(class_names))
  count = 0
  for batch, prediction, confusion in results:
    if labelled:
      metric.update(confusion)
    ids = [str(tile_id) for tile_id in batch['id']]
    written = 0
    for row, tile_id in enumerate(ids):
      if not tile_id:
        continue
      overlay.write_index_png(out_dir / f'{tile_id}.png', prediction[row])
      if count < num_overlays:
        example = overlay_image(count)
        if example['id'] != tile_id:
          raise ValueError(f'overlay {count}: the source has tile {example["id"]!r} where the '
                           f'eval iterator gave {tile_id!r}')
        overlay.save_overlay(overlay_dir / f'{tile_id}.png', example['image'],
                             prediction[row], example['valid'], class_names,
                             example['labels'] if labelled else None, title=tile_id)
      count += 1
      written += 1
    progress(written)
  result = {'num_tiles': count}
  if labelled:
    result.update(metric.compute())
  return result


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """``--mode=predict``: submission PNGs, overlays and (labelled splits) mIoU of a workdir's model.

  Returns:
    {'split', 'tta', 'modality', 'num_tiles' (of this process), 'tiles_per_second' (this
    process, after the first batch), 'output_dir'} plus, on a labelled split, 'miou' and
    'iou/<class>' (official challenge rule) of all processes' predictions.

  Raises:
    FileNotFoundError: the workdir has no checkpoint and config.init_from is empty.
    ValueError: a bad config field, named.
  """
  settings = config.predict
  mesh, model = experiment.setup_inference(config, settings.batch_size, 'config.predict.batch_size')
  variables = experiment.restore_variables(config, workdir, mesh)

  split = settings.split
  labelled = split in layout.LABELED_SPLITS
  data_config = config.data.copy_and_resolve_references()
  data_config.eval_batch_size = settings.batch_size
  index, count = jax.process_index(), jax.process_count()
  source = data_lib.create_source(data_config, split)
  batches = data_lib.create_eval_iterator(data_config, split, index, count)
  predictions_dir = workdir_lib.path(workdir) / 'predictions'
  out_dir = predictions_dir / split
  progress = Progress(f'predict {split} (tta {settings.tta})',
                      math.ceil((len(source) - index) / count))
  result = write_predictions(
      predict_batches(model, variables, batches, mesh, settings.tta), out_dir,
      data_lib.class_names(config.data.version), labelled=labelled,
      overlay_dir=predictions_dir / f'{split}_overlays',
      num_overlays=settings.num_overlays if index == 0 else 0,
      overlay_image=lambda k: source[index + k * count], progress=progress.update)
  result = {'split': split, 'tta': settings.tta, 'modality': config.data.modality,
            'tiles_per_second': progress.finish(), 'output_dir': str(out_dir), **result}
  if labelled:
    line = (f"predict {split} tta={settings.tta}: mIoU {result['miou']:.4f} over "
            f"{result['num_tiles']} tiles  " + '  '.join(
                f'{k[4:]} {v:.4f}' for k, v in result.items() if k.startswith('iou/')))
    logging.info(line)
    print(line)
    if index == 0:
      (predictions_dir / f'{split}_tta_{settings.tta}.json').write_text(
          json.dumps(result, indent=2))
  logging.info('predict %s: %d PNGs in %s', split, result['num_tiles'], out_dir)
  return result
