"""Configs: every documented paper command builds the row it claims; variants; validation."""

import os
import pathlib
import re
import shlex
import tempfile

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from agrivision_jax import configuration
from agrivision_jax import main as main_lib
from agrivision_jax.configs import common

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


# ImageNet weights of each (ibn_mode, arch): torchvision for ResNet, IBN-Net's releases otherwise.
IMAGENET_FILES = {
    ('none', 'resnet50'): 'resnet50-19c8e357.pth', ('none', 'resnet101'): 'resnet101-5d3b4d8f.pth',
    ('a', 'resnet50'): 'resnet50_ibn_a.pth', ('a', 'resnet101'): 'resnet101_ibn_a.pth',
    ('s', 'resnet50'): 'resnet50_ibn_a.pth', ('s', 'resnet101'): 'resnet101_ibn_a.pth',
    ('ab', 'resnet50'): 'resnet50_ibn_a.pth', ('ab', 'resnet101'): 'resnet101_ibn_a.pth',
    ('b', 'resnet50'): 'resnet50_ibn_b.pth', ('b', 'resnet101'): 'resnet101_ibn_b.pth',
}
# The authors' released code (LAOS-Y/AgriVision) where it differs from the paper's text: their
# yaml's 2,000 / 8,000 / 20,000 schedule run as 30,000 // 403 = 74 epochs of 403 iterations
# (12,901 tiles over 2 GPUs x 16, drop_last), validation and a checkpoint after every epoch,
# loss and SwitchNorm statistics per GPU batch of 16, BCE over every element, val 8 per GPU,
# a log line every 20 iterations.
AUTHORS = {
    'optim.warmup_steps': 2000, 'optim.constant_steps': 8000, 'optim.decay_steps': 20000,
    'num_train_steps': 74 * 403, 'eval_every_steps': 403, 'checkpoint_every_steps': 403,
    'loss.bce_over_all_pixels': True, 'loss.group_size': 16, 'model.sn_group_size': 16,
    'data.eval_batch_size': 16, 'log_every_steps': 20,
}


def flatten(config, prefix=''):
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


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


def load_config(name: str, arg: str = ''):
  """get_config(arg) of configs/<name>.py, loaded by path exactly as main.py's --config flag."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=False)
  fv(['main', f'--config={ROOT / "configs" / name}.py' + (f':{arg}' if arg else '')])
  return fv.config


def valid_field_mode_config():
  """The resnet config, valid, with the field inputs set (the field checks that join fields run
  in field mode only)."""
  config = load_config('resnet', '')
  config.data.data_dir, config.init_from = '/data/av', 'scratch'
  config.field.inputs = 'farm.tif'
  return config


def test_every_paper_row_is_documented_and_builds_its_row(tmp_path, monkeypatch):
  commands = documented_commands()
  assert set(commands) == set(ROWS)
  for row, command in commands.items():
    config, fv = parse_command(command, str(tmp_path), monkeypatch)
    arch, ibn_mode, lambdas, modality, in_channels = ROWS[row]
    got = (config.model.arch, config.model.ibn_mode,
           (config.loss.lambda_dice, config.loss.lambda_lovasz), config.data.modality,
           configuration.in_channels(config))
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
            config.model.num_low_level_features, configuration.num_classes(config)) == (
                16, (1, 2, 4), 3, 7)
    assert config.model.width == 64 and config.model.aspp_channels == 256
    # Pretrained weights are part of the row: without init_from, validate names the file.
    weights = IMAGENET_FILES[(ibn_mode, arch)]
    assert configuration.imagenet_weights(config) == weights
    if not config.init_from:
      with pytest.raises(ValueError, match=re.escape(f'download {weights}')):
        configuration.validate(config, device_count=8, process_count=2)
      config.init_from = 'scratch'
    elif config.init_from != 'scratch':
      # The documented converted-weights folder must exist: validate names it until it does.
      monkeypatch.chdir(tmp_path)
      if not os.path.isdir(config.init_from):
        with pytest.raises(FileNotFoundError, match=re.escape(config.init_from)):
          configuration.validate(config, device_count=8, process_count=2)
      os.makedirs(config.init_from, exist_ok=True)
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
  assert config.init_from == ''  # synthetic data: random initialisation needs no word
  # The demo data lives in a per-user cache folder, not in the shared temporary folder.
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  assert config.data.data_dir.startswith(os.path.join(cache, 'agrivision_jax') + os.sep)
  assert not config.data.data_dir.startswith(tempfile.gettempdir())


def test_the_rule_table_covers_exactly_the_fields_of_the_config():
  assert set(configuration.RULES) == set(flatten(common.base_config()))
  for name in ('resnet', 'ibn_a', 'ibn_b', 'ibn_s', 'default'):
    for arg in ('', 'depth=50,loss=hybrid,modality=nir,demo', 'authors'):
      assert set(flatten(load_config(name, arg))) == set(configuration.RULES), (name, arg)


@pytest.mark.parametrize('arg', ['depth=101,loss=hybrid,authors', 'depth=50,authors'])
def test_authors_variant_sets_exactly_the_authors_fields(arg):
  paper, authors = flatten(load_config('ibn_a', arg.replace(',authors', ''))), flatten(
      load_config('ibn_a', arg))
  changed = {field: value for field, value in authors.items() if paper[field] != value}
  assert changed == AUTHORS
  assert [(field, value) for field, _, value, _ in common.AUTHORS] == list(AUTHORS.items())
  assert all(paper[field] == default for field, default, _, _ in common.AUTHORS)
  assert all(where for *_, where in common.AUTHORS)
  config = load_config('ibn_a', arg)
  config.data.data_dir, config.init_from = '/data/av', 'scratch'
  for devices in (1, 2, 8, 16):  # a group of 16: whole groups per device or whole devices
    configuration.validate(config, device_count=devices)


def test_authors_demo_keeps_two_groups_per_batch():
  config = load_config('ibn_s', 'authors,demo')
  configuration.validate(config)
  assert config.model.sn_group_size == config.loss.group_size == config.data.batch_size // 2
  assert config.loss.bce_over_all_pixels and config.data.source == 'synthetic'


def test_channels_and_classes_follow_modality_and_version():
  config = load_config('ibn_s', 'demo')
  for modality, channels in {'nrgb': 4, 'rgb': 3, 'nir': 3}.items():
    config.data.modality = modality
    assert configuration.in_channels(config) == channels
  for version, classes in {'2020': 7, '2021': 9}.items():
    config.data.version = version
    assert configuration.num_classes(config) == classes


@pytest.mark.parametrize('field, value', [('model.in_channels', 4), ('model.num_classes', 7)])
def test_removed_fields_are_refused_on_the_command_line_and_in_validate(field, value, tmp_path,
                                                                        monkeypatch):
  with pytest.raises((KeyError, AttributeError), match=re.escape(field.split('.')[1])):
    parse_command(f'python -m agrivision_jax.main --config=configs/ibn_s.py:demo '
                  f'--config.{field}={value} --workdir=w', str(tmp_path), monkeypatch)
  config = load_config('ibn_s', 'demo')
  config.model[field.split('.')[1]] = value
  with pytest.raises(ValueError, match=re.escape(f'config.{field} is unknown: the')):
    configuration.validate(config)


def test_full_size_row_without_weights_names_file_and_command():
  config = load_config('ibn_b', 'depth=50,modality=rgb')
  config.data.data_dir = '/data/av'
  with pytest.raises(ValueError) as info:
    configuration.validate(config)
  message = str(info.value)
  assert '\n' not in message and message.startswith('config.init_from is empty')
  assert ('python scripts/convert_torch_weights.py --config=configs/ibn_b.py:depth=50,'
          'modality=rgb --input=resnet50_ibn_b.pth --output=<dir>') in message
  assert '--config.init_from=scratch' in message
  config.model.ibn_mode = 'ab'
  with pytest.raises(ValueError, match=re.escape(
      '--config=configs/ibn_a.py:depth=50,modality=rgb --config.model.ibn_mode=ab '
      '--input=resnet50_ibn_a.pth')):
    configuration.validate(config)


def test_resnet20_has_no_imagenet_weights_and_trains_from_scratch():
  config = load_config('ibn_s', 'depth=20')
  assert config.model.arch == 'resnet20'
  config.data.data_dir = '/data/av'
  with pytest.raises(ValueError) as info:
    configuration.validate(config)
  assert str(info.value) == ('config.init_from is empty and resnet20 has no published ImageNet '
                             'weights: pass --config.init_from=scratch or a converted weights '
                             'directory')
  with pytest.raises(ValueError, match="config.model.arch 'resnet20' has no published ImageNet"):
    configuration.imagenet_weights(config)
  config.init_from = 'scratch'
  configuration.validate(config)


def test_main_without_a_dataset_says_how_to_get_one(tmp_path, monkeypatch):
  config, _ = parse_command('python -m agrivision_jax.main --config=configs/ibn_s.py --workdir=w',
                            str(tmp_path), monkeypatch)
  with pytest.raises(ValueError) as info:
    main_lib.run_mode('train', config, str(tmp_path / 'w'))
  message = str(info.value)
  assert message.startswith('no dataset: pass --config.data.data_dir=')
  assert '--config.data.data_dir=' in message and ':demo' in message


@pytest.mark.parametrize('arg, message', [
    ('depth=34', "depth must be one of"),
    ('loss=focal', "loss must be one of"),
    ('modality=rgbn', "modality must be one of"),
    ('tiny', "unknown config variant 'tiny'"),
    ('demo=1', "unknown config variant 'demo=1'"),
    ('depth=50,depth=101', "given twice"),
])
def test_bad_variants_name_themselves(arg, message):
  with pytest.raises(flags.IllegalFlagValueError, match=re.escape(message)):
    load_config('ibn_a', arg)


@pytest.mark.parametrize('field, value, message', [
    ('model.ibn_mode', 'c', "config.model.ibn_mode must be one of ['none', 'a', 'b', 's', 'ab']"),
    ('model.output_stride', 12, "config.model.output_stride must be one of [8, 16, 32]"),
    ('model.output_stride', True, "config.model.output_stride must be one of"),
    ('model.dtype', 'float16', "config.model.dtype must be one of ['float32', 'bfloat16']"),
    ('model.multi_grid', (1, 2), "config.model.multi_grid must be () (off) or 3 positive ints"),
    ('model.multi_grid', (1, 0, 2), "config.model.multi_grid must be () (off) or 3 positive"),
    ('model.conv_impl', 'gpu', "config.model.conv_impl must be one of ['auto', 'xla', 'cpu_gemm']"),
    ('model.sn_group_size', -1, "config.model.sn_group_size must be an int >= 0"),
    ('model.sn_group_size', 12, "config.model.sn_group_size (12) must divide "
                                "config.data.batch_size (32) into whole groups"),
    ('loss.group_size', 64, "config.loss.group_size (64) must divide config.data.batch_size"),
    ('loss.group_size', 2.0, "config.loss.group_size must be an int >= 0"),
    ('data.batch_size', 12, "config.data.batch_size (12) must be divisible by the number of "
                            "devices (8)"),
    ('data.eval_batch_size', 4, "config.data.eval_batch_size (4) must be divisible by the number "
                                "of devices (8)"),
    ('data.image_size', 100, "config.data.image_size (100) must be a multiple of"),
    ('data.image_size', 0, "config.data.image_size must be a positive int, got 0"),
    ('data.version', '2019', "config.data.version must be one of ['2020', '2021']"),
    ('data.source', 'folder', "config.data.source must be one of ['synthetic', 'directory', "
                              "'tfds']"),
    ('data.modality', 'rgbn', "config.data.modality must be one of ['nrgb', 'rgb', 'nir']"),
    ('data.on_bad_example', 'ignore', "config.data.on_bad_example must be one of"),
    ('data.num_workers', -1, "config.data.num_workers must be an int >= 0"),
    ('data.data_dir', '', "config.data.data_dir is empty: pass --config.data.data_dir="),
    ('data.augment.hflip', 1, "config.data.augment.hflip must be True or False"),
    ('data.augment.shift_scale_aspect', 'yes', "config.data.augment.shift_scale_aspect must be"),
    ('data.synthetic.size', 8, "config.data.synthetic.size must be an int >= 16"),
    ('num_train_steps', 25001, "config.num_train_steps (25001) must not exceed"),
    ('optim.momentum', 1.0, "config.optim.momentum must be a number in [0, 1)"),
    ('optim.learning_rate', 0, "config.optim.learning_rate must be a number > 0"),
    ('loss.lambda_dice', -1.0, "config.loss.lambda_dice must be a number >= 0"),
    ('seed', -1, "config.seed must be an int in [0, 2**32)"),
    ('restore', 'first', "config.restore must be ['latest', 'best'] or a step (int >= 0)"),
    ('restore', -1, "config.restore must be ['latest', 'best'] or a step"),
    ('distributed', 'no', "config.distributed must be True or False"),
    ('divergence.pooling', 'channel', "config.divergence.pooling must be one of ['image', "
                                      "'batch']"),
    ('divergence.pairing', 'mean', "config.divergence.pairing must be one of ['replicate', "
                                   "'zero']"),
    ('divergence.split', 'dev', "config.divergence.split must be one of ['train', 'val', 'test']"),
    ('divergence.var_floor', -0.1, "config.divergence.var_floor must be a number >= 0"),
    ('predict.tta', 'd8', "config.predict.tta must be one of ['none', 'flips', 'd4']"),
    ('predict.num_overlays', -2, "config.predict.num_overlays must be an int >= 0"),
    ('predict.batch_size', 0, "config.predict.batch_size must be a positive int"),
    ('field.band_order', 'RGBZ', "config.field.band_order must be one letter per file band"),
    ('field.band_order', 'RGB', "config.field.band_order ('RGB') must include 'RGBN'"),
    ('field.band_order', 'RRGB', "config.field.band_order must be one letter per file band"),
    ('field.overlap', 512, "config.field.overlap (512) must be smaller than "
                           "config.data.image_size (512)"),
    ('field.overlap', -1, "config.field.overlap must be an int >= 0"),
    ('field.tta', 'flip', "config.field.tta must be one of ['none', 'flips', 'd4']"),
    ('field.batch_size', 0, "config.field.batch_size must be a positive int"),
    ('field.nodata', 'nan', "config.field.nodata must be -1 (the files' nodata tags) or a value"),
    ('field.nodata', -2, "config.field.nodata must be -1 (the files' nodata tags) or a value"),
    ('field.preview_size', 0, "config.field.preview_size must be a positive int"),
    ('field.inputs', None, "config.field.inputs must be a string, got None"),
    ('init_from', 0, "config.init_from must be a converted weights directory, 'scratch' or empty"),
])
def test_validate_names_the_bad_field(field, value, message, set_field):
  config = valid_field_mode_config()
  configuration.validate(config, device_count=8)
  set_field(config, field, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    configuration.validate(config, device_count=8)


@pytest.mark.parametrize('field, value', [
    ('restore', 'best'), ('restore', 0), ('restore', '4'), ('restore', 12000),
    ('field.band_order', 'NRGB'), ('field.band_order', 'BGRXNA'),
    ('field.nodata', 0), ('model.multi_grid', ()), ('model.sn_group_size', 8),
    ('loss.group_size', 32), ('model.conv_impl', 'xla'), ('data.source', 'tfds')])
def test_validate_accepts_the_allowed_values(field, value, set_field):
  config = valid_field_mode_config()
  set_field(config, field, value)
  configuration.validate(config, device_count=8)


def test_batches_must_divide_over_processes():
  config = load_config('ibn_s', 'demo')
  config.data.batch_size = 6
  with pytest.raises(ValueError, match=re.escape(
      'config.data.batch_size (6) must be divisible by the number of processes (4)')):
    configuration.validate(config, device_count=2, process_count=4)
  with pytest.raises(ValueError, match=re.escape(
      'config.data.eval_batch_size (8) must be divisible by the number of processes (3)')):
    configuration.validate(config, device_count=1, process_count=3)


def test_groups_must_not_straddle_devices():
  config = load_config('ibn_s', 'demo')
  config.data.batch_size = 48  # 6 images per device on 8 devices
  config.model.sn_group_size = 4  # divides 48, but a group of 4 would straddle two devices
  with pytest.raises(ValueError, match=re.escape('(6 images per device on 8 devices)')):
    configuration.validate(config, device_count=8)
  configuration.validate(config, device_count=4)  # 12 per device: 3 groups each
  config.model.sn_group_size = 12  # two whole devices of 6 per group
  configuration.validate(config, device_count=8)


def test_validate_missing_field_and_missing_init_from(tmp_path):
  config = load_config('resnet', '')
  config.data.data_dir = str(tmp_path)
  config.init_from = str(tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match=re.escape(f'config.init_from: no such directory: '
                                                        f'{tmp_path / "nope"}')):
    configuration.validate(config)
  config.init_from = str(tmp_path)
  configuration.validate(config)
  del config.optim['power']
  with pytest.raises(ValueError, match=re.escape('config.optim.power is missing')):
    configuration.validate(config)


@pytest.mark.parametrize('field, value', [('field.band_order', 'RGB'), ('field.overlap', 512)])
def test_field_settings_are_joined_with_the_model_only_in_field_mode(field, value,
                                                                     set_field):
  """Without config.field.inputs the field mode is not run: its tile settings are not checked
  against config.data."""
  config = load_config('resnet', '')
  config.data.data_dir, config.init_from = '/data/av', 'scratch'
  set_field(config, field, value)
  configuration.validate(config, device_count=8)
  config.field.inputs = 'farm.tif'
  with pytest.raises(ValueError, match=re.escape(f'config.{field} ')):
    configuration.validate(config, device_count=8)
