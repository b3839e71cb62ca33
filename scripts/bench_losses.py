"""Wall time of the hybrid loss (value and gradient) and of the validation counts.

  python scripts/bench_losses.py [--batch_size=32] [--size=512] [--num_classes=7] [--repeats=3]
      [--group_size=16] [--compare_sorts]

At paper scale (32 x 512 x 512 x 7) on the default JAX backend: jitted ``value_and_grad`` of
``hybrid`` (lambda_dice = lambda_lovasz = 1), its value alone (the eval path), the Lovasz term
alone, BCE + Dice alone, the training loss of ``make_loss`` with loss groups of ``--group_size``
images (the batch split over every device along 'data'), and ``metrics.batch_counts``; then the
sort the Lovasz term runs (one int32 sort, for the value and for the gradient), timed alone on
the same (C, B*H*W) operands, and its share of the Lovasz and hybrid times. ``--compare_sorts``
also times the alternatives (float keys, (error, label) pairs, (key, index) pairs, argsort).
Times are medians over ``--repeats`` runs after one compile run. Prints one line per figure and
a final JSON line.
"""
import json
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import app
from absl import flags
from jax import lax

from agrivision_jax import losses
from agrivision_jax import metrics

_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'images per batch')
_SIZE = flags.DEFINE_integer('size', 512, 'tile height and width')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 7, 'classes (background included)')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed runs after the compile run (median)')
_GROUP_SIZE = flags.DEFINE_integer('group_size', 16, 'images per loss group (0: the batch)')
_COMPARE_SORTS = flags.DEFINE_boolean('compare_sorts', False,
                                      'also time alternative sort formulations')


def median_seconds(function: Callable, *args) -> tuple[float, float]:
  """Median (wall, process CPU) seconds of ``function(*args)`` over the repeats, after a compile
  run. CPU seconds (all threads) are less sensitive to other jobs on a shared machine."""
  jax.block_until_ready(function(*args))
  walls, cpus = [], []
  for _ in range(_REPEATS.value):
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(function(*args))
    walls.append(time.perf_counter() - wall)
    cpus.append(time.process_time() - cpu)
  return statistics.median(walls), statistics.median(cpus)


def make_batch(shape: tuple[int, int, int, int]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Random logits (N(0, 2^2)), multi-hot labels (p = 0.3), valid (90 %) of ``shape``."""
  keys = jax.random.split(jax.random.key(0), 3)
  logits = 2.0 * jax.random.normal(keys[0], shape, jnp.float32)
  labels = (jax.random.uniform(keys[1], shape) < 0.3).astype(jnp.float32)
  valid = jax.random.uniform(keys[2], shape[:-1]) < 0.9
  return logits, labels, valid


def sort_operands(logits: jax.Array, labels: jax.Array,
                  valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The Lovasz term's per-class rows: errors f32, labels int32, int32 sort keys (C, B*H*W)."""
  classes = logits.shape[-1]
  positive = labels > 0.5
  errors = 1.0 - logits * jnp.where(positive, 1.0, -1.0)
  rows = lambda x: jnp.moveaxis(x, -1, 0).reshape(classes, -1)
  valid_rows = rows(jnp.broadcast_to(valid[..., None], logits.shape))
  # pylint: disable-next=protected-access
  keys = losses._sort_keys(rows(errors), rows(positive), valid_rows)
  return rows(errors), rows(positive).astype(jnp.int32), keys


def main(argv):
  del argv
  shape = (_BATCH_SIZE.value, _SIZE.value, _SIZE.value, _NUM_CLASSES.value)
  logits, labels, valid = make_batch(shape)
  results = {'shape': list(shape), 'backend': jax.default_backend(),
             'device': str(jax.devices()[0].device_kind), 'cpu_count': os.cpu_count(),
             'jax': jax.__version__, 'repeats': _REPEATS.value}

  def report(name: str, seconds: tuple[float, float]) -> None:
    results[f'{name}_s'], results[f'{name}_cpu_s'] = round(seconds[0], 4), round(seconds[1], 4)
    print(f'{name:<36s} {seconds[0]:9.3f} s wall {seconds[1]:9.3f} s cpu', flush=True)

  def loss_timer(loss: Callable, gradient: bool) -> tuple[float, float]:
    function = jax.value_and_grad(loss) if gradient else loss
    return median_seconds(jax.jit(function), logits, labels, valid)  # arguments, not constants

  hybrid = lambda x, y, v: losses.hybrid(x, y, v, 1.0, 1.0)
  bce_dice = lambda x, y, v: losses.hybrid(x, y, v, 1.0, 0.0)
  report('hybrid_value_and_grad', loss_timer(hybrid, True))
  report('hybrid_value', loss_timer(hybrid, False))
  report('lovasz_value_and_grad', loss_timer(losses.lovasz_hinge, True))
  report('lovasz_value', loss_timer(losses.lovasz_hinge, False))
  report('bce_dice_value_and_grad', loss_timer(bce_dice, True))
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  grouped = losses.make_loss(ml_collections.ConfigDict(dict(
      lambda_dice=1.0, lambda_lovasz=1.0, lovasz_per_image=False, dice_per_class=False,
      bce_over_all_pixels=False, group_size=_GROUP_SIZE.value)), mesh)
  results['group_size'], results['devices'] = _GROUP_SIZE.value, jax.device_count()
  report('grouped_hybrid_value_and_grad', median_seconds(
      jax.jit(jax.value_and_grad(grouped)),
      *(jax.device_put(x, data) for x in (logits, labels, valid))))
  report('batch_counts', median_seconds(jax.jit(metrics.batch_counts), logits, labels, valid))

  errors, positive, keys = jax.jit(sort_operands)(logits, labels, valid)
  # Value and gradient paths each sort the int32 keys alone, once.
  report('sort_keys_only', median_seconds(
      jax.jit(lambda k: lax.sort(k, is_stable=False)), keys))
  shares = {'sort_share_of_lovasz_value_and_grad': ('sort_keys_only', 'lovasz_value_and_grad'),
            'sort_share_of_hybrid_value_and_grad': ('sort_keys_only', 'hybrid_value_and_grad'),
            'sort_share_of_lovasz_value': ('sort_keys_only', 'lovasz_value')}
  for name, (part, whole) in shares.items():
    for clock in ('', '_cpu'):
      ratio = results[f'{part}{clock}_s'] / results[f'{whole}{clock}_s']
      results[name + clock] = round(ratio, 3)
    print(f'{name:<36s} {results[name]:9.3f}   wall {results[name + "_cpu"]:9.3f}   cpu')

  if _COMPARE_SORTS.value:
    report('alt_sort_float_errors', median_seconds(
        jax.jit(lambda e: jnp.sort(-e, axis=-1)), errors))
    report('alt_sort_float_error_label_pairs', median_seconds(
        jax.jit(lambda e, y: lax.sort((-e, y), num_keys=1)), errors, positive))
    iota = lax.broadcasted_iota(jnp.int32, keys.shape, 1)
    report('alt_sort_key_index_pairs', median_seconds(
        jax.jit(lambda k, i: lax.sort((k, i), num_keys=1, is_stable=False)), keys, iota))
    report('alt_argsort_float_errors', median_seconds(
        jax.jit(lambda e: jnp.argsort(-e, axis=-1)), errors))
  print(json.dumps(results))


if __name__ == '__main__':
  app.run(main)
