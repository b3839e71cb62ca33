"""Train-step, eval and input-pipeline throughput of a config, optionally against a PyTorch peer.

  PYTHONPATH=. python scripts/benchmark.py --config=configs/ibn_s.py:depth=50 \\
      --config.data.batch_size=2 --config.data.image_size=256 [--steps=7] [--peer=torch]

Runs the real jitted train step of ``agrivision_jax.train.make_train_step`` (forward, loss,
gradients, SGD update, confusion matrix) on a fixed random batch of the config's shape and prints,
after compilation: the median train-step time and images/s, the compile time, the peak memory
(the device's peak bytes in use where the backend reports it, else the host's peak RSS, labelled
as such), eval images/s (``make_eval_step``) and the input pipeline's examples/s
(``create_train_iterator`` on a synthetic set of the config's image size, generated in a temporary
folder). ``--peer=torch`` also runs, in the same process, the PyTorch DeepLabV3+ of
tests/torch_reference.py with the same architecture, input, batch, hybrid loss and SGD, at its
best CPU settings (channels_last, one intra-op thread per core); the JAX and PyTorch steps are
interleaved (A, B, A, B, ...) so that load changes hit both alike, and the ratio of the medians
JAX / PyTorch is printed. The last line is one JSON object with every figure, including
``conv_impl`` (``config.model.conv_impl`` resolved for the backend) and ``collectives``: how many
of each collective operation (all-reduce, all-gather, reduce-scatter, all-to-all,
collective-permute, ...) the compiled train step's HLO holds, counted statically (an op inside a
loop body counts once; an async start/done pair counts once).

What a config costs across devices, on one CPU host: ``--cpu_devices=8`` splits the host into 8
XLA devices (``jax_num_cpu_devices``; the batch size must divide by it), so the step is compiled
with the same collectives as on 8 accelerators:

  PYTHONPATH=. python scripts/benchmark.py --config=configs/ibn_s.py:depth=50,demo \
      --cpu_devices=8 --config.data.batch_size=8 --steps=2 --eval_steps=0 --pipeline_batches=0

XLA flags are set by ``agrivision_jax.runtime.configure_xla`` before JAX starts (set
``AGRIVISION_CPU_XLA_FLAGS=0`` to measure XLA's defaults), and ``runtime.configure_host_memory``
keeps the step's host memory mapped, as ``main.py`` does (``AGRIVISION_CPU_HOST_MEMORY=0`` to
measure without). Both peers share the process, and so the malloc settings.
"""
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from agrivision_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position

ADDED_XLA_FLAGS = runtime.configure_xla()

# pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.metadata
import json
import platform
import re
import resource
import statistics
import tempfile
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from agrivision_jax import configuration
from agrivision_jax import data as data_lib
from agrivision_jax import experiment
from agrivision_jax import models
from agrivision_jax import optim
from agrivision_jax import train
# pylint: enable=g-import-not-at-top,wrong-import-position

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file with variants, e.g. configs/ibn_s.py:depth=50.', lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 7, 'timed train steps (each side; median reported)')
_EVAL_STEPS = flags.DEFINE_integer('eval_steps', 5, 'timed eval steps (0 = skip eval)')
_PIPELINE_BATCHES = flags.DEFINE_integer('pipeline_batches', 5,
                                         'timed input-pipeline batches (0 = skip)')
_PEER = flags.DEFINE_enum('peer', '', ['', 'torch'], 'also run this eager peer, interleaved')
_THREADS = flags.DEFINE_integer('torch_threads', os.cpu_count(), 'torch.set_num_threads')
_CPU_DEVICES = flags.DEFINE_integer(
    'cpu_devices', 0, 'split the CPU backend into this many XLA devices (jax_num_cpu_devices); '
    '0 = leave as configured')
flags.mark_flag_as_required('config')


COLLECTIVE_OPS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'ragged-all-to-all',
                  'collective-permute', 'collective-broadcast')
# An HLO instruction's opcode follows its result shape: '= f32[8]{0} all-reduce(' or
# '= (f32[], f32[]) all-reduce-start('; instruction names ('%all-reduce.3 =') never match.
_COLLECTIVE = re.compile(r'[\s)](' + '|'.join(COLLECTIVE_OPS) + r')(?:-start)?\(')


def count_collectives(hlo_text: str) -> dict[str, int]:
  """How many of each collective operation an HLO module's text holds.

  Args:
    hlo_text: ``jax.jit(f).lower(...).compile().as_text()`` (the optimised module).
  Returns:
    {op: count} for every op of ``COLLECTIVE_OPS`` (0 when absent); an async ``*-start`` /
    ``*-done`` pair counts as one op, and an op inside a loop body counts once.
  """
  counts = dict.fromkeys(COLLECTIVE_OPS, 0)
  for match in _COLLECTIVE.finditer(hlo_text):
    counts[match.group(1)] += 1
  return counts


def model_io(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(in_channels, num_classes) of the config's model."""
  return configuration.in_channels(config), configuration.num_classes(config)


def build_model(config: ml_collections.ConfigDict) -> Any:
  """The config's DeepLabV3+ module (the script's one call of ``models.create_model``)."""
  return models.create_model(config.model, in_channels=configuration.in_channels(config),
                             num_classes=configuration.num_classes(config))


def random_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
  """A fixed host batch of the config's shape: image N(0,1) (B,S,S,Cin) float32, labels 0/1
  (B,S,S,C) uint8 (p = 0.3), as the data pipeline gives them, valid (B,S,S) bool (95 %)."""
  rng = np.random.default_rng(seed)
  size, batch = config.data.image_size, config.data.batch_size
  in_channels, classes = model_io(config)
  return {
      'image': rng.standard_normal((batch, size, size, in_channels), np.float32),
      'labels': (rng.random((batch, size, size, classes)) < 0.3).astype(np.uint8),
      'valid': rng.random((batch, size, size)) < 0.95,
  }


def _timed(function: Callable[[], Any]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(function())
  return time.perf_counter() - start


class JaxSide:
  """The project's train and eval steps on one batch; ``step()`` runs one donated train step."""

  def __init__(self, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray]):
    self.mesh = experiment.create_mesh()
    model = build_model(config)
    tx = optim.create_optimizer(config.optim)
    start = time.perf_counter()
    self.state = jax.block_until_ready(experiment.create_train_state(config, model, tx, self.mesh))
    self.init_seconds = time.perf_counter() - start
    self.batch = experiment.shard_batch(batch, self.mesh)
    step = train.make_train_step(config, model, self.mesh)
    start = time.perf_counter()
    self.train_step = step.lower(self.state, self.batch).compile()
    self.compile_seconds = time.perf_counter() - start
    cost = self.train_step.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get('flops', 0.0)) if cost else 0.0
    self.collectives = count_collectives(self.train_step.as_text())
    self.eval_step = train.make_eval_step(config, model, self.mesh)
    self.metrics = None

  def step(self) -> Any:
    self.state, self.metrics = self.train_step(self.state, self.batch)
    return self.metrics

  def evaluate(self) -> Any:
    variables = {'params': self.state.params, 'batch_stats': self.state.batch_stats}
    return self.eval_step(variables, self.batch)


class TorchSide:
  """The eager PyTorch peer: tests/torch_reference.py's DeepLab, hybrid loss, SGD."""

  def __init__(self, config: ml_collections.ConfigDict, batch: dict[str, np.ndarray],
               threads: int):
    import torch  # pylint: disable=g-import-not-at-top (optional)
    from tests import torch_reference  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    m = config.model
    in_channels, num_classes = model_io(config)
    self.model = torch_reference.DeepLab(
        arch=m.arch, ibn_mode=m.ibn_mode, output_stride=m.output_stride,
        multi_grid=tuple(m.multi_grid), in_channels=in_channels, num_classes=num_classes,
        num_low_level_feat=m.num_low_level_features, width=m.width,
        aspp_channels=m.aspp_channels, decoder_channels=m.decoder_channels,
        low_level_channels=m.low_level_channels).to(memory_format=torch.channels_last)
    self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.optim.learning_rate,
                                     momentum=config.optim.momentum,
                                     weight_decay=config.optim.weight_decay)
    self.autocast = m.dtype == 'bfloat16'
    self.loss_weights = (config.loss.lambda_dice, config.loss.lambda_lovasz)
    self.loss_fn = torch_reference.torch_hybrid_loss
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))
    self.image = nchw(batch['image']).contiguous(memory_format=torch.channels_last)
    self.labels = nchw(batch['labels']).float()
    self.valid = torch.from_numpy(batch['valid'])

  def step(self) -> float:
    self.model.train()
    self.optimizer.zero_grad(set_to_none=True)
    with self.torch.autocast('cpu', dtype=self.torch.bfloat16, enabled=self.autocast):
      logits = self.model(self.image)
    loss = self.loss_fn(logits.float(), self.labels, self.valid, *self.loss_weights)
    loss.backward()
    self.optimizer.step()
    return loss.item()

  def evaluate(self) -> float:
    """Eval-mode forward and the hybrid loss, as the JAX eval step (which also counts the
    confusion matrix)."""
    self.model.eval()
    with self.torch.no_grad():
      with self.torch.autocast('cpu', dtype=self.torch.bfloat16, enabled=self.autocast):
        logits = self.model(self.image)
      return self.loss_fn(logits.float(), self.labels, self.valid, *self.loss_weights).item()


def interleaved(functions: dict[str, Callable[[], Any]], count: int) -> dict[str, list[float]]:
  """Times each function once per round, alternating, ``count`` rounds; seconds per call."""
  times = {name: [] for name in functions}
  for _ in range(count):
    for name, function in functions.items():
      times[name].append(_timed(function))
  return times


def pipeline_examples_per_second(config: ml_collections.ConfigDict, batches: int) -> float:
  """examples/s of the training input pipeline (decode, augment, normalise, batch) on a
  synthetic set of the config's image size, after its first batch."""
  data_config = ml_collections.ConfigDict(config.data.to_dict())
  with tempfile.TemporaryDirectory() as folder:
    data_config.source = 'synthetic'
    data_config.data_dir = folder
    data_config.num_workers = min(data_config.num_workers, os.cpu_count() or 1)
    data_config.synthetic.size = data_config.image_size
    data_config.synthetic.num_train = max(2 * data_config.batch_size, 8)
    data_config.synthetic.num_val = data_config.synthetic.num_test = 1
    iterator = data_lib.create_train_iterator(data_config, config.seed, 0, 1)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      next(iterator)
    elapsed = time.perf_counter() - start
  return batches * data_config.batch_size / elapsed


def peak_memory() -> dict[str, Any]:
  """The device's peak bytes in use where the backend reports them, else the host's peak RSS."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return {'peak_memory_mb': stats['peak_bytes_in_use'] / 2**20, 'peak_memory_kind': 'device'}
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
  return {'peak_memory_mb': rss_kb / 1024, 'peak_memory_kind': 'host RSS (whole process)'}


def versions() -> dict[str, str]:
  names = ['jax', 'jaxlib', 'flax', 'optax'] + (['torch'] if _PEER.value else [])
  return {name: importlib.metadata.version(name) for name in names}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  host_memory_configured = runtime.configure_host_memory()
  config = _CONFIG.value
  if _STEPS.value < 1:
    raise ValueError(f'--steps must be >= 1, got {_STEPS.value}')
  if _CPU_DEVICES.value < 0:
    raise ValueError(f'--cpu_devices must be >= 0, got {_CPU_DEVICES.value}')
  if _CPU_DEVICES.value:
    jax.config.update('jax_num_cpu_devices', _CPU_DEVICES.value)
  if config.data.batch_size % jax.device_count():
    raise ValueError(f'config.data.batch_size={config.data.batch_size} must be divisible by the '
                     f'number of devices ({jax.device_count()})')
  batch_size = config.data.batch_size
  batch = random_batch(config)
  jax_side = JaxSide(config, batch)
  conv_impl = models.resolve_conv_impl(config.model.conv_impl)
  print(f'jax: {jax.device_count()} {jax.default_backend()} devices, conv_impl {conv_impl}, '
        f'init {jax_side.init_seconds:.1f} s, compile {jax_side.compile_seconds:.1f} s',
        flush=True)
  collectives = ', '.join(f'{op} {n}' for op, n in jax_side.collectives.items() if n)
  print(f'train step collectives: {collectives or "none"}', flush=True)
  sides: dict[str, Any] = {'jax': jax_side}
  if _PEER.value == 'torch':
    sides['torch'] = TorchSide(config, batch, _THREADS.value)
  for _ in range(2):  # first runs: allocation, kernel selection, warm caches
    for side in sides.values():
      _timed(side.step)
  train_times = interleaved({name: side.step for name, side in sides.items()}, _STEPS.value)
  losses_now = {'jax': float(jax_side.metrics[0].compute()['loss'])}
  results: dict[str, Any] = {
      'config': sys.argv[1:], 'device': str(jax.devices()[0].device_kind),
      'backend': jax.default_backend(), 'cpu_count': os.cpu_count(),
      'machine': platform.processor() or platform.machine(), 'versions': versions(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''), 'added_xla_flags': list(ADDED_XLA_FLAGS),
      'host_memory_configured': host_memory_configured,
      'arch': config.model.arch, 'ibn_mode': config.model.ibn_mode,
      'dtype': config.model.dtype, 'batch_size': batch_size,
      'image_size': config.data.image_size, 'steps': _STEPS.value,
      'init_s': jax_side.init_seconds, 'compile_s': jax_side.compile_seconds,
      'train_step_flops': jax_side.flops, 'device_count': jax.device_count(),
      'conv_impl': conv_impl, 'collectives': jax_side.collectives,
  }
  for name, times in train_times.items():
    median = statistics.median(times)
    results[f'{name}_step_s'] = median
    results[f'{name}_step_times_s'] = times
    results[f'{name}_train_images_per_s'] = batch_size / median
    print(f'{name}: train step median {median:.3f} s  ({batch_size / median:.2f} images/s)  '
          f'all {[round(t, 3) for t in times]}', flush=True)
  results['jax_gflops_per_s'] = jax_side.flops / results['jax_step_s'] / 1e9
  if 'torch' in sides:
    results['ratio_jax_over_torch'] = results['jax_step_s'] / results['torch_step_s']
    results['ratio_jax_over_torch_fastest'] = min(train_times['jax']) / min(train_times['torch'])
    losses_now['torch'] = sides['torch'].step()
    print(f'train step ratio JAX / PyTorch: {results["ratio_jax_over_torch"]:.3f}', flush=True)
  results['last_loss'] = losses_now
  if _EVAL_STEPS.value:
    for side in sides.values():
      _timed(side.evaluate)
    eval_times = interleaved({n: s.evaluate for n, s in sides.items()}, _EVAL_STEPS.value)
    for name, times in eval_times.items():
      results[f'{name}_eval_images_per_s'] = batch_size / statistics.median(times)
      print(f'{name}: eval {results[f"{name}_eval_images_per_s"]:.2f} images/s', flush=True)
    if 'torch' in sides:
      results['eval_ratio_jax_over_torch'] = (results['torch_eval_images_per_s']
                                              / results['jax_eval_images_per_s'])
  results.update(peak_memory())
  if _PIPELINE_BATCHES.value:
    results['pipeline_examples_per_s'] = pipeline_examples_per_second(config,
                                                                      _PIPELINE_BATCHES.value)
    print(f'input pipeline: {results["pipeline_examples_per_s"]:.1f} examples/s', flush=True)
  print(json.dumps(results))


if __name__ == '__main__':
  app.run(main)
