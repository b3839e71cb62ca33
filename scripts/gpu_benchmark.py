"""The paper's model's train step on one GPU, JAX beside the PyTorch peer: one prepared command.

  PYTHONPATH=. python scripts/gpu_benchmark.py            # one GPU: rows start within 360 s
  PYTHONPATH=. python scripts/gpu_benchmark.py --smoke    # CPU, tiny, well under a minute

Rows: IBN-s DeepLabV3+ (configs/ibn_s.py: ResNet-101, hybrid loss BCE + Dice + Lovasz), 512 x 512
RGB+NIR, batches 16 and 32, compute float32 and bfloat16, each under ``config.model.conv_impl``
'xla' and 'cpu_gemm'; then the PyTorch peer: the DeepLabV3+ of tests/torch_reference.py (the peer
of scripts/benchmark.py) with the same architecture, batch, hybrid loss and SGD, on CUDA with
channels_last, ``cudnn.benchmark = True`` and bf16 autocast (``--torch_dtypes``). TF32 is matched
to XLA: JAX's default precision for float32 dots and convolutions on Ampere and newer GPUs is TF32
(docs.jax.dev, "Matmul precision"), so the peer sets ``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32`` to True.

The JAX step is ``agrivision_jax.train.make_train_step``'s computation (forward with batch-stat
updates, loss, gradients, SGD + weight decay, confusion matrix) built here from models, losses,
optim and metrics, on one device: ``agrivision_jax.train`` imports checkpointing (grain, orbax),
data (grain, PIL) and writers (tensorboardX), which a bare GPU image need not have. The script
imports nothing of grain, tensorflow_datasets or tensorboardX.

Per row: compile s (the JAX train step's ``lower().compile()``; for PyTorch the first step,
cudnn autotuning included), median and p90 step ms over ``--steps`` timed steps after
``--warmup``, images/s, peak GB (JAX: ``device.memory_stats()['peak_bytes_in_use']``, the
process's peak so far: the rows run per conv_impl ('xla' first) from the smallest batch up, and
``compiled_gb`` gives each row's compiled step's arguments + outputs + temporaries, which is also
the peak where the backend has no memory statistics; PyTorch:
``torch.cuda.max_memory_allocated`` reset per row, on CPU the process's peak RSS), TFLOP per step
(XLA ``compiled.cost_analysis()['flops']`` of the JAX step; the PyTorch rows use the same count),
MFU (that count / step time / the dense peak: ``--peak_bf16_tflops`` 989, ``--peak_tf32_tflops``
495, H200), the Lovasz share (a jitted Lovasz-hinge-only forward + backward at the step's logits
shape, (B, S, S, 7) float32, over the step's time) and the JAX / PyTorch step-time ratio (same
batch and compute dtype). A row that fails (out of memory, say) carries its error; the others run.
Rows not started within ``--budget_s`` are listed as skipped. The PyTorch peer runs first in a
child process, so that JAX's GPU memory pool does not starve it.

Output: the table as rows finish, the table again, then one JSON line with every figure. With
``$OUT`` set (or ``--out``), the JSON and the table are also written to gpu_benchmark.json and
gpu_benchmark.txt there.
"""
import argparse
import functools
import gc
import importlib.metadata
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

PEAK_TFLOPS = {'bfloat16': 989.0, 'float32': 495.0}  # H200 SXM dense: bf16, TF32
SMOKE = dict(width=8, image_size=64, batch_sizes='2', steps=2, warmup=0, arch='resnet20',
             dtypes='bfloat16', conv_impls='xla', budget_s=600.0)
TABLE_HEADER = (f'{"row":<34} {"compile s":>9} {"median ms":>10} {"p90 ms":>9} {"img/s":>8} '
                f'{"peak GB":>8} {"TFLOP":>7} {"MFU %":>6} {"Lovasz %":>8} {"JAX/PT":>7}')


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--smoke', action='store_true',
                      help='CPU, tiny: ResNet-20 width 8, 64 px, batch 2, 2 steps, one bfloat16 '
                      'xla row and the peer on CPU (other flags override)')
  parser.add_argument('--arch', default='resnet101',
                      choices=('resnet20', 'resnet50', 'resnet101'))
  parser.add_argument('--width', type=int, default=64, help='stem width (64 = the paper)')
  parser.add_argument('--image_size', type=int, default=512)
  parser.add_argument('--batch_sizes', default='16,32')
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--conv_impls', default='xla,cpu_gemm')
  parser.add_argument('--torch_dtypes', default='bfloat16',
                      help="PyTorch peer compute: 'bfloat16' (autocast) and/or 'float32' (TF32); "
                      "'' = no peer")
  parser.add_argument('--steps', type=int, default=10, help='timed steps per row')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps after compiling')
  parser.add_argument('--budget_s', type=float, default=360.0,
                      help='start no row after this many seconds')
  parser.add_argument('--peak_bf16_tflops', type=float, default=PEAK_TFLOPS['bfloat16'])
  parser.add_argument('--peak_tf32_tflops', type=float, default=PEAK_TFLOPS['float32'])
  parser.add_argument('--out', default=os.environ.get('OUT', ''),
                      help='write gpu_benchmark.json / .txt here (default $OUT)')
  parser.add_argument('--torch_child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.smoke:
    for name, value in SMOKE.items():
      if getattr(args, name) == parser.get_default(name):
        setattr(args, name, value)
  args.batch_sizes = [int(b) for b in args.batch_sizes.split(',') if b]
  args.dtypes = [d for d in args.dtypes.split(',') if d]
  args.conv_impls = [c for c in args.conv_impls.split(',') if c]
  args.torch_dtypes = [d for d in args.torch_dtypes.split(',') if d]
  for name, values, allowed in (('dtypes', args.dtypes, PEAK_TFLOPS),
                                ('torch_dtypes', args.torch_dtypes, PEAK_TFLOPS),
                                ('conv_impls', args.conv_impls, ('xla', 'cpu_gemm', 'auto'))):
    bad = [v for v in values if v not in allowed]
    if bad:
      parser.error(f'--{name}: {bad} not in {tuple(allowed)}')
  if args.steps < 1 or args.warmup < 0 or not args.batch_sizes or min(args.batch_sizes) < 1:
    parser.error('--steps >= 1, --warmup >= 0 and positive --batch_sizes are required')
  return args


# ----------------------------------------------------------------------------- shared


def experiment_config(args: argparse.Namespace) -> Any:
  """configs/ibn_s.py at ``--arch``'s depth with the script's model size (hybrid loss)."""
  from agrivision_jax.configs import common  # pylint: disable=g-import-not-at-top
  config = common.get_config('depth=' + args.arch[len('resnet'):], ibn_mode='s',
                             default_loss='hybrid')
  config.model.width = args.width
  if args.width < 64:  # a tiny smoke model: head widths shrunk alike
    config.model.aspp_channels = config.model.decoder_channels = 4 * args.width
    config.model.low_level_channels = args.width
  config.data.image_size = args.image_size
  return config


def model_io(config: Any) -> tuple[int, int]:
  """(in_channels, num_classes) of the config's model: R, G, B, NIR in; the 7 classes of the 2020
  release out (``configuration`` derives the same, but imports the grain data pipeline, which
  the bare GPU image lacks)."""
  assert config.data.modality == 'nrgb' and config.data.version == '2020'
  return 4, 7


def host_batch(config: Any, batch_size: int, seed: int = 0) -> dict[str, Any]:
  """image N(0,1) (B,S,S,Cin) float32, labels 0/1 (B,S,S,C) uint8 (p 0.3), valid (B,S,S) bool."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  in_channels, classes = model_io(config)
  return {
      'image': rng.standard_normal((batch_size, size, size, in_channels), np.float32),
      'labels': (rng.random((batch_size, size, size, classes)) < 0.3).astype(np.uint8),
      'valid': rng.random((batch_size, size, size)) < 0.95,
  }


def summarize(times_s: list[float], batch_size: int) -> dict[str, float]:
  """Median / p90 step ms and images/s of per-step seconds."""
  ordered = sorted(times_s)
  p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
  median = statistics.median(ordered)
  return {'step_ms_median': 1e3 * median, 'step_ms_p90': 1e3 * p90,
          'images_per_s': batch_size / median, 'step_times_ms': [1e3 * t for t in times_s]}


def error_text(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else ""}'


def versions(names: list[str]) -> dict[str, str]:
  found = {}
  for name in names:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = 'absent'
  return found


# ----------------------------------------------------------------------------- PyTorch peer


def torch_rows(args: argparse.Namespace) -> dict[str, Any]:
  """The PyTorch peer's rows (run in the child process): {'device', 'versions', 'rows'}."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference  # pylint: disable=g-import-not-at-top
  cuda = torch.cuda.is_available() and not args.smoke
  device = torch.device('cuda' if cuda else 'cpu')
  torch.backends.cudnn.benchmark = True
  torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default float32 precision on GPU: TF32
  torch.backends.cudnn.allow_tf32 = True
  config = experiment_config(args)
  m = config.model
  in_channels, num_classes = model_io(config)
  rows = []
  for batch_size in args.batch_sizes:
    batch = host_batch(config, batch_size)
    nchw = lambda x: torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))  # noqa: E731
    image = nchw(batch['image']).to(device).contiguous(memory_format=torch.channels_last)
    labels = nchw(batch['labels']).to(device).float()
    valid = torch.from_numpy(batch['valid']).to(device)
    for dtype in args.torch_dtypes:
      row = {'framework': 'torch', 'batch_size': batch_size, 'dtype': dtype,
             'label': f'torch {dtype} b{batch_size}'}
      rows.append(row)
      model = optimizer = None
      try:
        torch.manual_seed(config.seed)
        model = torch_reference.DeepLab(
            arch=m.arch, ibn_mode=m.ibn_mode, output_stride=m.output_stride,
            multi_grid=tuple(m.multi_grid), in_channels=in_channels, num_classes=num_classes,
            num_low_level_feat=m.num_low_level_features, width=m.width,
            aspp_channels=m.aspp_channels, decoder_channels=m.decoder_channels,
            low_level_channels=m.low_level_channels).to(device, memory_format=torch.channels_last)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=config.optim.learning_rate,
                                    momentum=config.optim.momentum,
                                    weight_decay=config.optim.weight_decay)

        def step():
          optimizer.zero_grad(set_to_none=True)
          with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == 'bfloat16'):
            logits = model(image)
          loss = torch_reference.torch_hybrid_loss(logits.float(), labels, valid,
                                                   config.loss.lambda_dice,
                                                   config.loss.lambda_lovasz)
          loss.backward()
          optimizer.step()
          if cuda:
            torch.cuda.synchronize()

        if cuda:
          torch.cuda.reset_peak_memory_stats()
        row['compile_s'] = timed(step)
        for _ in range(args.warmup):
          step()
        row.update(summarize([timed(step) for _ in range(args.steps)], batch_size))
        if cuda:
          row['peak_gb'], row['peak_kind'] = torch.cuda.max_memory_allocated() / 1e9, 'device'
        else:
          row['peak_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
          row['peak_kind'] = 'host RSS (process)'
      except Exception as e:  # pylint: disable=broad-except (a row's failure is reported in it)
        row['error'] = error_text(e)
      del model, optimizer
      gc.collect()
      if cuda:
        torch.cuda.empty_cache()
  return {'device': torch.cuda.get_device_name() if cuda else 'cpu', 'rows': rows,
          'versions': versions(['torch']), 'tf32': {
              'matmul': torch.backends.cuda.matmul.allow_tf32,
              'cudnn': torch.backends.cudnn.allow_tf32}}


def run_torch_child(args: argparse.Namespace, argv: list[str], timeout_s: float
                    ) -> dict[str, Any]:
  """Runs ``torch_rows`` in a child process (JAX kept off the GPU there); errors become rows."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'PYTHONPATH': os.pathsep.join(p for p in (REPO_ROOT, os.environ.get('PYTHONPATH')) if p)}
  command = [sys.executable, os.path.abspath(__file__), *argv, '--torch_child=1', '--out=']
  try:
    result = subprocess.run(command, env=env, capture_output=True, text=True,
                            timeout=max(timeout_s, 30.0), check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
      return json.loads(lines[-1])
    problem = (result.stderr.strip().splitlines() or ['no output'])[-1]
    problem = f'peer process exited {result.returncode}: {problem}'
  except subprocess.TimeoutExpired:
    problem = f'peer process ran past {timeout_s:.0f} s'
  return {'device': 'unknown', 'versions': {}, 'rows': [
      {'framework': 'torch', 'batch_size': b, 'dtype': d, 'label': f'torch {d} b{b}',
       'error': problem} for b in args.batch_sizes for d in args.torch_dtypes]}


# ----------------------------------------------------------------------------- JAX


def timed(function: Callable[[], Any]) -> float:
  start = time.perf_counter()
  result = function()
  if result is not None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.block_until_ready(result)
  return time.perf_counter() - start


def build_model(config: Any) -> Any:
  """The config's DeepLabV3+ module (the script's one call of ``models.create_model``)."""
  from agrivision_jax import models  # pylint: disable=g-import-not-at-top
  in_channels, num_classes = model_io(config)
  return models.create_model(config.model, in_channels=in_channels, num_classes=num_classes)


def make_train_step(model: Any, loss_fn: Callable, tx: Any, seed: int) -> Callable:
  """``agrivision_jax.train.make_train_step``'s step on one device (state donated):
  ``step(state, batch) -> (state, {'loss', 'confusion'})``; state = {'step', 'params',
  'batch_stats', 'opt_state'}; batch image (B,H,W,Cin), labels (B,H,W,C), valid (B,H,W)."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from agrivision_jax import metrics  # pylint: disable=g-import-not-at-top
  dropout_root = jax.random.fold_in(jax.random.key(seed), 1)

  def step(state, batch):
    rng = jax.random.fold_in(dropout_root, state['step'])

    def loss_and_aux(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': state['batch_stats']}, batch['image'], train=True,
          mutable=['batch_stats'], rngs={'dropout': rng})
      return loss_fn(logits, batch['labels'], batch['valid']), (logits, updates['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
        state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {'step': state['step'] + 1, 'params': optax.apply_updates(state['params'], updates),
                 'batch_stats': batch_stats, 'opt_state': opt_state}
    return new_state, {'loss': loss, 'confusion': metrics.confusion_matrix(
        logits, batch['labels'], batch['valid'])}

  return jax.jit(step, donate_argnums=0)


def loss_timings(config: Any, batch: dict[str, Any], args: argparse.Namespace
                 ) -> dict[str, float]:
  """Median ms of jitted forward + backward of the Lovasz hinge alone and of the hybrid loss,
  at logits (B, S, S, C) float32 (the model's logits)."""
  import jax  # pylint: disable=g-import-not-at-top
  from agrivision_jax import losses  # pylint: disable=g-import-not-at-top
  logits = jax.random.normal(jax.random.key(1), batch['labels'].shape, 'float32')
  labels, valid = batch['labels'], batch['valid']
  lovasz = lambda x: losses.lovasz_hinge(  # noqa: E731
      x, labels, valid, per_image=config.loss.lovasz_per_image)
  timings = {}
  for name, loss in (('lovasz', lovasz),
                     ('hybrid_loss', lambda x: losses.make_loss(config.loss)(x, labels, valid))):
    call = functools.partial(jax.jit(jax.value_and_grad(loss)), logits)
    for _ in range(1 + args.warmup):  # compile, warm up
      timed(call)
    timings[f'{name}_ms'] = 1e3 * statistics.median(timed(call) for _ in range(args.steps))
  return timings


def compiled_bytes(compiled: Any) -> float | None:
  """Arguments + outputs + temporaries - aliased bytes of a compiled executable, if reported."""
  try:
    m = compiled.memory_analysis()
    return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except (backends without memory analysis)
    return None


def initial_variables(model: Any, in_channels: int) -> dict[str, Any]:
  """Host-drawn variables of ``model``'s structure (``jax.eval_shape`` of its init, no compiled
  init): conv kernels N(0, 2 / (kh * kw * out)) as the backbone's init, norm scales and running
  variances 1, everything else 0. Step times do not depend on the values."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from agrivision_jax import models  # pylint: disable=g-import-not-at-top
  images = jax.ShapeDtypeStruct((1, models.INIT_SIZE, models.INIT_SIZE, in_channels), 'float32')
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      std = math.sqrt(2.0 / (math.prod(leaf.shape[:-2]) * leaf.shape[-1]))
      return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)
    return np.full(leaf.shape, 1.0 if name in ('scale', 'var') else 0.0, leaf.dtype)

  return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


def jax_row(config: Any, variables: dict[str, Any], batch: dict[str, Any], dtype: str,
            conv_impl: str, args: argparse.Namespace) -> dict[str, Any]:
  """One JAX row: compile, warm up, time ``args.steps`` donated train steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from agrivision_jax import losses, models, optim  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  config.model.dtype, config.model.conv_impl = dtype, conv_impl
  batch_size = batch['image'].shape[0]
  row: dict[str, Any] = {
      'framework': 'jax', 'batch_size': batch_size, 'dtype': dtype, 'conv_impl': conv_impl,
      'conv_impl_resolved': models.resolve_conv_impl(conv_impl),
      'label': f'jax {dtype} {conv_impl} b{batch_size}'}
  model = build_model(config)
  # The convolution the built model really uses (its ``conv`` ModuleDef).
  row['model_conv_impl'] = next(name for name, conv in models.CONV_MODULES.items()
                                if conv is model.conv)
  tx = optim.create_optimizer(config.optim)
  step = make_train_step(model, losses.make_loss(config.loss), tx, config.seed)
  params = jax.tree.map(jnp.copy, variables['params'])
  state = {'step': jnp.zeros((), jnp.int32), 'params': params,
           'batch_stats': jax.tree.map(jnp.copy, variables.get('batch_stats', {})),
           'opt_state': tx.init(params)}
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  row['compile_s'] = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  row['tflop_per_step'] = float(cost.get('flops', 0.0)) / 1e12 if cost else 0.0
  estimate = compiled_bytes(compiled)

  loss = None

  def one_step():
    nonlocal state, loss
    state, step_metrics = compiled(state, batch)
    loss = step_metrics['loss']
    return loss

  for _ in range(args.warmup):
    timed(one_step)
  row.update(summarize([timed(one_step) for _ in range(args.steps)], batch_size))
  row['final_loss'] = float(jax.device_get(loss))
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    row['peak_gb'], row['peak_kind'] = stats['peak_bytes_in_use'] / 1e9, 'device (process so far)'
  elif estimate:
    row['peak_gb'], row['peak_kind'] = estimate / 1e9, 'compiled step arguments+outputs+temps'
  if estimate:
    row['compiled_gb'] = estimate / 1e9
  peak = {'bfloat16': args.peak_bf16_tflops, 'float32': args.peak_tf32_tflops}[dtype]
  row['mfu'] = row['tflop_per_step'] / (row['step_ms_median'] / 1e3) / peak
  del state, compiled
  return row


def format_row(row: dict[str, Any]) -> str:
  if 'error' in row or 'skipped' in row:
    return f'{row["label"]:<34} ' + (f'FAILED {row["error"]}' if 'error' in row
                                     else f'skipped: {row["skipped"]}')

  def number(key, digits, scale=1.0):
    value = row.get(key)
    return '-' if value is None else f'{value * scale:.{digits}f}'

  return (f'{row["label"]:<34} {number("compile_s", 1):>9} {number("step_ms_median", 1):>10} '
          f'{number("step_ms_p90", 1):>9} {number("images_per_s", 1):>8} '
          f'{number("peak_gb", 2):>8} {number("tflop_per_step", 3):>7} '
          f'{number("mfu", 1, 100):>6} {number("lovasz_share", 1, 100):>8} '
          f'{number("jax_over_torch", 2):>7}')


def add_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
  """Fills each JAX row's 'jax_over_torch' (its median step time / the PyTorch row of the same
  batch and dtype) and the PyTorch rows' TFLOP / MFU from the JAX count; returns the ratios."""
  torch_by = {(r['batch_size'], r['dtype']): r for r in rows
              if r['framework'] == 'torch' and 'step_ms_median' in r}
  ratios = {}
  for row in rows:
    peer = torch_by.get((row['batch_size'], row['dtype']))
    if row['framework'] != 'jax' or 'step_ms_median' not in row or peer is None:
      continue
    row['jax_over_torch'] = row['step_ms_median'] / peer['step_ms_median']
    ratios[row['label']] = row['jax_over_torch']
    if 'tflop_per_step' not in peer:
      peer['tflop_per_step'] = row['tflop_per_step']
      peer['mfu'] = row['mfu'] * row['step_ms_median'] / peer['step_ms_median']
  return ratios


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  if args.torch_child:
    print(json.dumps(torch_rows(args)), flush=True)
    return
  started = time.perf_counter()
  if args.smoke:
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  peer = (run_torch_child(args, argv, args.budget_s / 2) if args.torch_dtypes
          else {'device': None, 'versions': {}, 'rows': []})
  import jax  # pylint: disable=g-import-not-at-top (after the peer has freed the GPU)
  config = experiment_config(args)
  in_channels, _ = model_io(config)
  print(f'{jax.devices()[0].device_kind} ({jax.default_backend()}), {args.arch} IBN-s width '
        f'{args.width}, {args.image_size} px, hybrid loss; PyTorch peer on {peer["device"]}',
        flush=True)
  print(TABLE_HEADER, flush=True)
  for row in peer['rows']:
    print(format_row(row), flush=True)
  start = time.perf_counter()
  variables = jax.block_until_ready(initial_variables(build_model(config), in_channels))
  init_s = time.perf_counter() - start
  rows, loss_ms = [], {}
  batches = {}
  for conv_impl in args.conv_impls:
    for batch_size in args.batch_sizes:
      if batch_size not in batches:
        batches[batch_size] = jax.device_put(host_batch(config, batch_size))
      batch = batches[batch_size]
      for dtype in args.dtypes:
        label = f'jax {dtype} {conv_impl} b{batch_size}'
        if time.perf_counter() - started > args.budget_s:
          row = {'framework': 'jax', 'batch_size': batch_size, 'dtype': dtype,
                 'conv_impl': conv_impl, 'label': label,
                 'skipped': f'--budget_s={args.budget_s:.0f} reached'}
        else:
          try:
            row = jax_row(config, variables, batch, dtype, conv_impl, args)
          except Exception as e:  # pylint: disable=broad-except (reported in the row)
            row = {'framework': 'jax', 'batch_size': batch_size, 'dtype': dtype,
                   'conv_impl': conv_impl, 'label': label, 'error': error_text(e)}
          gc.collect()
        if 'step_ms_median' in row and batch_size not in loss_ms:
          try:
            loss_ms[batch_size] = loss_timings(config, batch, args)
          except Exception as e:  # pylint: disable=broad-except
            loss_ms[batch_size] = {'error': error_text(e)}
        if 'lovasz_ms' in loss_ms.get(batch_size, {}) and 'step_ms_median' in row:
          row['lovasz_share'] = loss_ms[batch_size]['lovasz_ms'] / row['step_ms_median']
        rows.append(row)
        print(format_row(row), flush=True)
  all_rows = rows + peer['rows']
  ratios = add_ratios(all_rows)
  table = '\n'.join([TABLE_HEADER] + [format_row(r) for r in all_rows])
  print('\n' + table, flush=True)
  results = {
      'device': jax.devices()[0].device_kind, 'backend': jax.default_backend(),
      'torch_device': peer['device'], 'torch_tf32': peer.get('tf32'),
      'versions': {**versions(['jax', 'jaxlib', 'flax', 'optax']), **peer['versions']},
      'settings': {'arch': args.arch, 'ibn_mode': config.model.ibn_mode, 'width': args.width,
                   'image_size': args.image_size, 'steps': args.steps, 'warmup': args.warmup,
                   'loss': {'lambda_dice': config.loss.lambda_dice,
                            'lambda_lovasz': config.loss.lambda_lovasz},
                   'peak_tflops': {'bfloat16': args.peak_bf16_tflops,
                                   'float32': args.peak_tf32_tflops},
                   'smoke': args.smoke},
      'init_s': init_s, 'loss_ms': {str(b): v for b, v in loss_ms.items()},
      'rows': all_rows, 'jax_over_torch': ratios,
      'total_s': time.perf_counter() - started,
  }
  line = json.dumps(results)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'gpu_benchmark.json'), 'w') as f:
      f.write(line + '\n')
    with open(os.path.join(args.out, 'gpu_benchmark.txt'), 'w') as f:
      f.write(table + '\n')
  print(line, flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
