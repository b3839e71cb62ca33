"""Configs: every documented paper command builds the row it claims; variants; validation."""

import pathlib
import re
import shlex
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from agrivision_jax import configuration
from agrivision_jax import main as main_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The fields that define each row of the paper's tables (independent of configs/default.py).
# (table, row) -> (arch, ibn_mode, (lambda_dice, lambda_lovasz), data.modality, model.in_channels)
ROWS = {
    ('2', 'ResNet-50'): ('resnet50', 'none', (1.0, 0.0), 'nrgb', 4),
    ('2', 'IBN-Net50-a'): ('resnet50', 'a', (1.0, 0.0), 'nrgb', 4),
    ('2', 'IBN-Net50-b'): ('resnet50', 'b', (1.0, 0.0), 'nrgb', 4),
    ('2', 'IBN-Net50-s'): ('resnet50', 's', (1.0, 0.0), 'nrgb', 4),
    ('2', 'ResNet-101'): ('resnet101', 'none', (1.0, 0.0), 'nrgb', 4),
    ('2', 'IBN-Net101-a'): ('resnet101', 'a', (1.0, 0.0), 'nrgb', 4),
    ('2', 'IBN-Net101-b'): ('resnet101', 'b', (1.0, 0.0), 'nrgb', 4),
    ('2', 'IBN-Net101-s'): ('resnet101', 's', (1.0, 0.0), 'nrgb', 4),
    ('3', 'IBN-Net101-a, BCE (0,0)'): ('resnet101', 'a', (0.0, 0.0), 'nrgb', 4),
    ('3', 'IBN-Net101-a, BCE+Dice (1,0)'): ('resnet101', 'a', (1.0, 0.0), 'nrgb', 4),
    ('3', 'IBN-Net101-a, BCE+Lovasz (0,1)'): ('resnet101', 'a', (0.0, 1.0), 'nrgb', 4),
    ('3', 'IBN-Net101-a, hybrid (1,1)'): ('resnet101', 'a', (1.0, 1.0), 'nrgb', 4),
    ('final', 'IBN-Net101-s, hybrid (test set 54.0)'): ('resnet101', 's', (1.0, 1.0), 'nrgb', 4),
    ('1', 'train RGB'): ('resnet101', 'none', (1.0, 0.0), 'rgb', 3),
    ('1', 'train NIR'): ('resnet101', 'none', (1.0, 0.0), 'nir', 3),
    ('1', 'RGB-trained, tested on NIR'): ('resnet101', 'none', (1.0, 0.0), 'nir', 3),
    ('1', 'NIR-trained, tested on RGB'): ('resnet101', 'none', (1.0, 0.0), 'rgb', 3),
}


def documented_commands() -> dict[tuple[str, str], str]:
  """(table, row) -> command, from the table in docs/reproduce.md."""
  commands = {}
  for line in (ROOT / 'docs' / 'reproduce.md').read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if len(cells) == 4 and cells[3].startswith('`python -m agrivision_jax.main'):
      commands[(cells[0], cells[1])] = cells[3].strip('`')
  return commands


def parse_command(command: str, data_dir: str, monkeypatch):
  """Parses a documented command's flags exactly as main.py would; returns (config, flags)."""
  monkeypatch.chdir(ROOT)
  argv = shlex.split(command.replace('$AV', data_dir))
  assert argv[:3] == ['python', '-m', 'agrivision_jax.main']
  argv = ['main', *argv[3:]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  flags.DEFINE_string('workdir', None, '', flag_values=fv)
  flags.DEFINE_enum('mode', 'train', main_lib.MODES, '', flag_values=fv)
  fv(argv)
  return fv.config, fv


def load_config(name: str, arg: str):
  """get_config(arg) of configs/<name>.py, loaded by path like ml_collections does."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(f'test_cfg_{name}', ROOT / 'configs' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_every_paper_row_is_documented_and_builds_its_row(tmp_path, monkeypatch):
  commands = documented_commands()
  assert set(commands) == set(ROWS)
  for row, command in commands.items():
    config, fv = parse_command(command, str(tmp_path), monkeypatch)
    arch, ibn_mode, lambdas, modality, in_channels = ROWS[row]
    got = (config.model.arch, config.model.ibn_mode,
           (config.loss.lambda_dice, config.loss.lambda_lovasz), config.data.modality,
           config.model.in_channels)
    assert got == (arch, ibn_mode, lambdas, modality, in_channels), row
    assert config.data.data_dir == str(tmp_path)
    assert fv.mode == ('evaluate' if 'tested on' in row[1] else 'train')
    # Paper hyperparameters (section 4 of the paper), shared by every row.
    assert (config.data.batch_size, config.data.image_size, config.data.source) == (
        32, 512, 'directory')
    assert (config.optim.learning_rate, config.optim.momentum, config.optim.weight_decay) == (
        0.01, 0.9, 5e-4)
    assert (config.optim.warmup_steps, config.optim.constant_steps, config.optim.decay_steps,
            config.optim.power, config.num_train_steps) == (1000, 7000, 17000, 0.9, 25000)
    assert (config.model.output_stride, tuple(config.model.multi_grid),
            config.model.num_low_level_features, config.model.num_classes) == (16, (1, 2, 4), 3, 7)
    assert config.model.width == 64 and config.model.aspp_channels == 256
    configuration.validate(config, device_count=8, process_count=2)


def test_table1_workdirs_pair_training_and_cross_evaluation():
  commands = documented_commands()
  workdir = lambda row: re.search(r'--workdir=(\S+)', commands[('1', row)]).group(1)
  assert workdir('RGB-trained, tested on NIR') == workdir('train RGB')
  assert workdir('NIR-trained, tested on RGB') == workdir('train NIR')


def test_command_line_overrides_reach_nested_fields(tmp_path, monkeypatch):
  config, _ = parse_command(
      'python -m agrivision_jax.main --config=configs/ibn_s.py:depth=50,demo '
      '--config.optim.learning_rate=0.2 --config.data.augment.hflip=False '
      '--config.model.multi_grid=(1,1,1) --workdir=w', str(tmp_path), monkeypatch)
  assert config.model.arch == 'resnet50' and config.model.ibn_mode == 's'
  assert config.optim.learning_rate == 0.2
  assert config.data.augment.hflip is False
  assert tuple(config.model.multi_grid) == (1, 1, 1)
  assert config.data.source == 'synthetic'


def test_demo_is_small_and_valid():
  config = load_config('ibn_s', 'demo')
  configuration.validate(config)
  assert config.data.source == 'synthetic' and config.model.ibn_mode == 's'
  assert config.data.image_size <= 96 and config.model.width <= 16
  assert config.num_train_steps <= 2000
  assert (config.loss.lambda_dice, config.loss.lambda_lovasz) == (1.0, 1.0)


@pytest.mark.parametrize('arg, message', [
    ('depth=34', "depth must be one of"),
    ('loss=focal', "loss must be one of"),
    ('modality=rgbn', "modality must be one of"),
    ('tiny', "unknown config variant 'tiny'"),
    ('demo=1', "unknown config variant 'demo=1'"),
    ('depth=50,depth=101', "given twice"),
])
def test_bad_variants_name_themselves(arg, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    load_config('ibn_a', arg)


@pytest.mark.parametrize('field, value, message', [
    ('model.in_channels', 3, "config.model.in_channels is 3 but config.data.modality='nrgb'"),
    ('data.modality', 'rgb', "config.model.in_channels is 4 but config.data.modality='rgb'"),
    ('model.num_classes', 9, "config.model.num_classes is 9 but config.data.version='2020'"),
    ('model.ibn_mode', 'c', "config.model.ibn_mode must be one of"),
    ('model.output_stride', 12, "config.model.output_stride must be one of"),
    ('model.dtype', 'float16', "config.model.dtype must be one of"),
    ('data.batch_size', 12, "config.data.batch_size (12) must be divisible by the number of "
                            "devices (8)"),
    ('data.eval_batch_size', 4, "config.data.eval_batch_size (4) must be divisible by the number "
                                "of devices (8)"),
    ('data.image_size', 100, "config.data.image_size (100) must be a multiple of"),
    ('num_train_steps', 25001, "config.num_train_steps (25001) must not exceed"),
    ('optim.momentum', 1.0, "config.optim.momentum must be a number in [0, 1)"),
    ('optim.learning_rate', 0, "config.optim.learning_rate must be a number > 0"),
    ('data.data_dir', '', "config.data.data_dir must name the dataset folder"),
    ('data.augment.hflip', 1, "config.data.augment.hflip must be True or False"),
])
def test_validate_names_the_bad_field(field, value, message):
  config = load_config('resnet', '')
  config.data.data_dir = '/data/av'
  group, _, name = field.rpartition('.')
  parent = config
  for part in filter(None, group.split('.')):
    parent = parent[part]
  with parent.ignore_type():
    parent[name] = value
  with pytest.raises(ValueError, match=re.escape(message)):
    configuration.validate(config, device_count=8)


def test_validate_missing_field_and_missing_init_from(tmp_path):
  config = load_config('resnet', '')
  config.data.data_dir = str(tmp_path)
  config.init_from = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match=re.escape(f'config.init_from: no such directory: '
                                                        f'{tmp_path / "nope"}')):
    configuration.validate(config)
  config.init_from = ''
  del config.optim['power']
  with pytest.raises(ValueError, match=re.escape('config.optim.power is missing')):
    configuration.validate(config)


def test_main_mode_without_its_module_is_a_clear_error(monkeypatch):
  monkeypatch.setitem(sys.modules, 'agrivision_jax.predict', None)
  with pytest.raises(ValueError, match=re.escape('--mode=predict is not available')):
    main_lib.run_mode('predict', load_config('ibn_s', 'demo'), '/tmp/unused')
