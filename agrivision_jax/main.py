"""Command-line entry point.

  python -m agrivision_jax.main --config=configs/ibn_s.py:demo --workdir=/tmp/demo_ibn_s
  python -m agrivision_jax.main --config=configs/ibn_a.py:depth=101,loss=hybrid \\
      --config.data.data_dir=/data/Agriculture-Vision --workdir=workdirs/ibn101_a_hybrid
  python -m agrivision_jax.main --config=... --workdir=... --mode=evaluate --config.restore=best

Modes: train (resumes from the workdir's newest checkpoint that restores), evaluate, divergence,
predict and field (on the checkpoint ``--config.restore`` names: latest, best or a step; field:
whole-field images, docs/field.md). Every mode
holds the workdir's lock (``workdir.lock``) while it runs. ``--workdir`` may be a local path or an
etils.epath URL such as gs://bucket/run.

Exit status: 0 done; 1 an error, told in one line on stderr (bad config value or data file,
missing checkpoint, workdir in use, config differing from the workdir's, NaN loss, failed
checkpoint save); 2 a bad command line (unknown flag or config field, bad value);
128 + N (143 SIGTERM, 130 SIGINT) stopped by a first signal N after saving a checkpoint (run
the same command to resume), or killed by a second one at once; 130 also for Ctrl-C before the
training loop started.
``--traceback`` adds Python tracebacks.
"""

import difflib
import importlib
import logging as std_logging
import os
import re
import sys
import traceback

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from agrivision_jax import checkpointing
from agrivision_jax import experiment
from agrivision_jax import preemption
from agrivision_jax import runtime
from agrivision_jax import workdir as workdir_lib
from agrivision_jax import writers

# mode -> (module, function(config, workdir)). The module is imported when its mode runs: a
# training run does not load what the analysis modes draw with (matplotlib, about 0.5 s).
_MODE_ENTRIES = {
    'train': ('agrivision_jax.train', 'train_and_evaluate'),
    'evaluate': ('agrivision_jax.train', 'evaluate'),
    'divergence': ('agrivision_jax.divergence', 'run'),
    'predict': ('agrivision_jax.predict', 'run'),
    'field': ('agrivision_jax.field', 'run'),
}
MODES = tuple(_MODE_ENTRIES)
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
PROG = 'agrivision_jax.main'
# Errors of input, configuration or environment: reported in one line (programming errors are not).
USER_ERRORS = (ValueError, OSError, FloatingPointError, workdir_lib.WorkdirBusyError,
               writers.ConfigMismatchError, checkpointing.CheckpointSaveError,
               checkpointing.CheckpointRestoreError)

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/ibn_s.py:demo (variants after ":").',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory (or gs:// URL) for checkpoints, metrics and outputs.')
_MODE = flags.DEFINE_enum('mode', 'train', MODES, 'What to run.')
_TRACEBACK = flags.DEFINE_bool('traceback', False,
                               'Show the Python traceback of an error, not just its one line.')
_CACHE_DIR = flags.DEFINE_string(
    'compilation_cache_dir', os.path.join(os.path.expanduser('~'), '.cache', 'agrivision_jax',
                                          'jax'),
    'Persistent XLA compilation cache ("" = off): a second start with the same shapes skips '
    'most compilation.')
flags.mark_flags_as_required(['config', 'workdir'])


def one_line(error: BaseException) -> str:
  """The message of ``error`` on one line (its first and last lines when it holds a traceback)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if any(line.startswith('Traceback (most recent call last)') for line in lines):
    return f'{lines[0]} {lines[-1]}'
  return ' '.join(lines)


def _config_fields(config, prefix: str = '') -> list[str]:
  """Every field path of ``config`` ('model', 'model.width', ...)."""
  paths = []
  for name, value in config.items():
    path = f'{prefix}{name}'
    paths.append(path)
    if hasattr(value, 'items'):
      paths.extend(_config_fields(value, f'{path}.'))
  return paths


def unknown_config_field(argv: list[str], config) -> str | None:
  """A one-line error for the first ``--config.<path>`` of ``argv`` that ``config`` lacks.

  Args:
    argv: the command line.
    config: the config file's ConfigDict before overrides.

  Returns:
    'unknown config field config.model.widht (in --config.model.widht=4); closest:
    config.model.width' (the closest names by difflib), or None when every path exists.
  """
  known = _config_fields(config)
  for arg in argv[1:]:
    match = re.match(r'--(?:no)?config\.([\w.]+)', arg)
    if match and match.group(1) not in known:
      path = match.group(1)
      parent = path.rpartition('.')[0]
      siblings = [k for k in known if k.rpartition('.')[0] == parent] if parent in known else known
      close = (difflib.get_close_matches(path, siblings, n=3, cutoff=0.5)
               or difflib.get_close_matches(path, known, n=3, cutoff=0.5))
      hint = f'; closest: {", ".join(f"config.{c}" for c in close)}' if close else ''
      return f'unknown config field config.{path} (in {arg}){hint}'
  return None


def _config_spec(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.partition('=')[2]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad flag or config field in one line (exit status 2)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
    if '--traceback' in argv:
      traceback.print_exc()
    message = None
    spec = _config_spec(argv)
    if isinstance(e, (AttributeError, KeyError)) and spec:
      message = unknown_config_field(argv, flags.FLAGS['config'].parser.parse(spec))
    print(f'{PROG}: error: {message or one_line(e)}', file=sys.stderr)
    sys.exit(EXIT_USAGE)


def check_dataset(config) -> None:
  """A one-line ValueError saying how to point at data when ``config.data.data_dir`` is ''."""
  if not config.data.data_dir:
    raise ValueError(
        'no dataset: pass --config.data.data_dir=/path/to/Agriculture-Vision (the folder holding '
        "train/ and val/), or use the ':demo' variant (synthetic data), e.g. "
        '--config=configs/ibn_s.py:demo')


def run_mode(mode: str, config, workdir: str):
  """Runs ``mode`` on ``config`` while holding ``workdir``'s lock.

  Raises:
    ValueError: unknown mode or no dataset configured.
    workdir.WorkdirBusyError: another run holds ``workdir``.
  """
  if mode not in MODES:
    raise ValueError(f'--mode must be one of {MODES}, got {mode!r}')
  check_dataset(config)
  experiment.initialize_distributed(config)  # before the lock: it starts the JAX backend
  module, function = _MODE_ENTRIES[mode]
  run = getattr(importlib.import_module(module), function)
  with workdir_lib.lock(workdir):
    return run(config, workdir)


def _drop_orbax_info(record) -> bool:
  """Logging filter: orbax logs dozens of INFO lines per checkpoint; keep its warnings only."""
  return record.levelno >= std_logging.WARNING or f'{os.sep}orbax{os.sep}' not in record.pathname


def main(argv: list[str]) -> None:
  """Configures XLA and the compilation cache, then runs the mode; errors exit as documented."""
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_logger().addFilter(_drop_orbax_info)
  import jax  # pylint: disable=g-import-not-at-top
  runtime.configure_host_memory()
  if _CACHE_DIR.value:
    jax.config.update('jax_compilation_cache_dir', _CACHE_DIR.value)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 2.0)
  # No device is touched here: multi-host runs must call jax.distributed.initialize first.
  logging.info('JAX %s; workdir %s; mode %s', jax.__version__, _WORKDIR.value, _MODE.value)
  try:
    run_mode(_MODE.value, _CONFIG.value, _WORKDIR.value)
  except preemption.Preempted as e:
    print(f'{PROG}: {one_line(e)}', file=sys.stderr)
    sys.exit(e.exit_status)
  except KeyboardInterrupt:  # Ctrl-C before training installed its handlers (e.g. compiling)
    print(f'{PROG}: interrupted', file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)
  except USER_ERRORS as e:
    if _TRACEBACK.value:
      traceback.print_exc()
    print(f'{PROG}: error: {one_line(e)}', file=sys.stderr)
    sys.exit(EXIT_ERROR)


if __name__ == '__main__':
  runtime.configure_xla()
  app.run(main, flags_parser=parse_flags)
