"""main.py's command-line manners: one-line errors, unknown config fields, no dataset, busy
workdir."""

import os
import pathlib
import subprocess
import sys

import pytest

from agrivision_jax import main
from agrivision_jax import workdir
from agrivision_jax.configs import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_one_line_joins_lines_and_shortens_nested_tracebacks():
  assert main.one_line(ValueError('config.x must be > 0\n  got -1')) == ('config.x must be > 0 '
                                                                        'got -1')
  nested = ('flag --config=configs/ibn_s.py:dem: Error whilst parsing config file:\n\n'
            'Traceback (most recent call last):\n  File "x.py", line 1\n'
            "ValueError: unknown config variant 'dem'")
  assert main.one_line(ValueError(nested)) == (
      "flag --config=configs/ibn_s.py:dem: Error whilst parsing config file: "
      "ValueError: unknown config variant 'dem'")
  assert main.one_line(OSError()) == 'OSError'


@pytest.mark.parametrize('arg, expected', [
    ('--config.model.widht=4', 'unknown config field config.model.widht (in '
                               '--config.model.widht=4); closest: config.model.width'),
    ('--config.modl.width=4', 'unknown config field config.modl.width (in --config.modl.width=4);'
                              ' closest: config.model.width'),
    ('--noconfig.loss.lovasz_per_imag', 'unknown config field config.loss.lovasz_per_imag (in '
                                        '--noconfig.loss.lovasz_per_imag); closest: '
                                        'config.loss.lovasz_per_image'),
    ('--config.zzzzzz=1', 'unknown config field config.zzzzzz (in --config.zzzzzz=1)'),
])
def test_unknown_config_field_names_the_path_and_the_closest_fields(arg, expected):
  config = common.get_config('depth=50')
  argv = ['main', '--config=configs/resnet.py', '--config.model.width=8', arg, '--workdir=w']
  message = main.unknown_config_field(argv, config)
  assert message == expected or message.startswith(expected + ', '), message  # closest first


def test_known_config_fields_pass():
  argv = ['main', '--config.model.width=8', '--noconfig.loss.lovasz_per_image',
          '--config.data.augment.hflip=False', '--config.model=x']
  assert main.unknown_config_field(argv, common.get_config('depth=50')) is None


def test_no_dataset_says_how_to_get_one():
  config = common.get_config('depth=50')
  with pytest.raises(ValueError, match=r"^no dataset: pass --config\.data\.data_dir=.*':demo'"):
    main.check_dataset(config)
  main.check_dataset(common.get_config('depth=50,demo'))


def test_a_busy_workdir_is_refused(tmp_path):
  config = common.get_config('depth=50,demo')
  with workdir.lock(str(tmp_path)):
    with pytest.raises(workdir.WorkdirBusyError, match=f'workdir {tmp_path} is in use by pid '
                                                       f'{os.getpid()}'):
      main.run_mode('evaluate', config, str(tmp_path))


def run_main(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'agrivision_jax.main', *args], cwd=cwd,
                        env={**os.environ, 'PYTHONPATH': str(ROOT)}, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize('args, status, message', [
    (['--config=configs/ibn_s.py'], 1,
     "error: no dataset: pass --config.data.data_dir=/path/to/Agriculture-Vision"),
    (['--config=configs/ibn_s.py:demo', '--config.model.foo=1'], 2,
     'error: unknown config field config.model.foo (in --config.model.foo=1); closest: '),
    (['--config=configs/ibn_s.py:demo', '--config.model.width=abc'], 2,
     "error: flag --config.model.width=abc: invalid literal for int() with base 10: 'abc'"),
    (['--config=configs/ibn_s.py:demo', '--mode=evaluate', '--config.restore=best'], 1,
     'error: no checkpoint directory '),
])
def test_command_line_errors_are_one_line_without_traceback(tmp_path, args, status, message):
  result = run_main(*args, f'--workdir={tmp_path}', '--compilation_cache_dir=')
  assert result.returncode == status, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('agrivision_jax.main: ' + message), result.stderr[-3000:]
