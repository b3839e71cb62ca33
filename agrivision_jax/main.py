"""Command-line entry point.

  python -m agrivision_jax.main --config=configs/ibn_s.py:demo --workdir=/tmp/demo_ibn_s
  python -m agrivision_jax.main --config=configs/ibn_a.py:depth=101,loss=hybrid \\
      --config.data.data_dir=/data/Agriculture-Vision --workdir=workdirs/ibn101_a_hybrid
  python -m agrivision_jax.main --config=... --workdir=... --mode=evaluate --config.data.modality=nir

Modes: train (resumes from the workdir's latest checkpoint), evaluate (latest checkpoint on the
val split), divergence and predict (their own modules, on the workdir's latest checkpoint).
"""

import importlib
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from agrivision_jax import runtime

MODES = ('train', 'evaluate', 'divergence', 'predict')

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/ibn_s.py:demo (variants after ":").',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and metrics.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to run.')
_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache_dir', os.path.join(os.path.expanduser('~'), '.cache', 'agrivision_jax',
                                          'jax'),
    'Persistent XLA compilation cache ("" = off): a second start with the same shapes skips '
    'most compilation.')
flags.mark_flags_as_required(['config', 'workdir'])


def run_mode(mode: str, config, workdir: str):
  """Dispatches ``mode`` to train / evaluate / divergence.run / predict.run.

  Raises:
    ValueError: unknown mode, or a mode whose module is not part of this installation.
  """
  if mode == 'train':
    from agrivision_jax import train  # pylint: disable=g-import-not-at-top
    return train.train_and_evaluate(config, workdir)
  if mode == 'evaluate':
    from agrivision_jax import train  # pylint: disable=g-import-not-at-top
    return train.evaluate(config, workdir)
  if mode in ('divergence', 'predict'):
    try:
      module = importlib.import_module(f'agrivision_jax.{mode}')
    except ModuleNotFoundError as e:
      if e.name != f'agrivision_jax.{mode}':
        raise
      module = None
    if module is None or not hasattr(module, 'run'):
      raise ValueError(f'--mode={mode} is not available: agrivision_jax.{mode}.run(config, '
                       'workdir) is missing from this installation')
    return module.run(config, workdir)
  raise ValueError(f'--mode must be one of {MODES}, got {mode!r}')


def _drop_orbax_info(record) -> bool:
  """Logging filter: orbax logs dozens of INFO lines per checkpoint; keep its warnings only."""
  return record.levelno >= std_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def main(argv: list[str]) -> None:
  """Configures XLA and the compilation cache, then runs the mode on the config and workdir."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_logger().addFilter(_drop_orbax_info)
  import jax  # pylint: disable=g-import-not-at-top (after the XLA flags are set)
  runtime.configure_host_memory()
  if _CACHE_DIR.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
  # No device is touched here: multi-host runs must call jax.distributed.initialize first.
  logging.info('JAX %s; workdir %s; mode %s', jax.__version__, _WORKDIR.value, _MODE.value)
  run_mode(_MODE.value, _CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  runtime.configure_xla()
  app.run(main)
