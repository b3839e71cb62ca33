"""Up-front checks of a whole experiment config, so bad values fail before any compute."""

import os
from collections.abc import Callable
from typing import Any

import ml_collections

IN_CHANNELS_BY_MODALITY = {'nrgb': 4, 'rgb': 3, 'nir': 3}
NUM_CLASSES_BY_VERSION = {'2020': 7, '2021': 9}
_CHOICES = {
    'model.arch': ('resnet50', 'resnet101'),
    'model.ibn_mode': ('none', 'a', 'b', 's', 'ab'),
    'model.output_stride': (8, 16, 32),
    'model.in_channels': (3, 4),
    'model.num_classes': (7, 9),
    'model.num_low_level_features': (1, 3),
    'model.dtype': ('float32', 'bfloat16'),
    'data.source': ('synthetic', 'directory', 'tfds'),
    'data.version': ('2020', '2021'),
    'data.modality': ('nrgb', 'rgb', 'nir'),
    'data.on_bad_example': ('error', 'skip'),
}
_POSITIVE_INTS = (
    'model.width', 'model.aspp_channels', 'model.decoder_channels',
    'model.low_level_channels', 'data.image_size', 'data.batch_size', 'data.eval_batch_size',
    'optim.decay_steps', 'num_train_steps', 'log_every_steps', 'eval_every_steps',
    'checkpoint_every_steps', 'max_checkpoints_to_keep')
_NON_NEGATIVE_INTS = ('data.num_workers', 'optim.warmup_steps', 'optim.constant_steps')
_NON_NEGATIVE_FLOATS = ('loss.lambda_dice', 'loss.lambda_lovasz', 'optim.weight_decay')
_BOOLS = ('loss.lovasz_per_image', 'loss.dice_per_class', 'loss.bce_over_all_pixels',
          'data.augment.shift_scale_rotate', 'data.augment.hflip', 'data.augment.vflip',
          'data.augment.rot90', 'distributed')


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split('.'):
    if part not in value:
      raise ValueError(f'config.{field} is missing')
    value = value[part]
  return value


def _check(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ValueError(f'config.{field} {message}')


def _check_each(config, fields: tuple[str, ...], test: Callable[[Any], bool], what: str) -> None:
  for field in fields:
    value = _get(config, field)
    _check(test(value), field, f'must be {what}, got {value!r}')


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(config: ml_collections.ConfigDict, device_count: int = 1,
             process_count: int = 1) -> None:
  """Checks every field of the contract and their combinations.

  Args:
    config: the experiment config (configs/default.py).
    device_count: devices the global batch is sharded over (``jax.device_count()``).
    process_count: processes that each load ``batch_size // process_count`` examples.

  Raises:
    ValueError: naming the first bad field (or pair of fields) and the allowed values.
    FileNotFoundError: ``config.init_from`` names a directory that does not exist.
  """
  for field, allowed in _CHOICES.items():
    value = _get(config, field)
    _check(value in allowed and type(value) is type(allowed[0]), field,
           f'must be one of {list(allowed)}, got {value!r}')
  _check(_is_int(_get(config, 'seed')), 'seed', f"must be an int, got {config.seed!r}")
  _check_each(config, _POSITIVE_INTS, lambda v: _is_int(v) and v > 0, 'a positive int')
  _check_each(config, _NON_NEGATIVE_INTS, lambda v: _is_int(v) and v >= 0, 'an int >= 0')
  _check_each(config, _NON_NEGATIVE_FLOATS, lambda v: _is_number(v) and v >= 0, 'a number >= 0')
  _check_each(config, _BOOLS, lambda v: isinstance(v, bool), 'True or False')
  _check_each(config, ('optim.learning_rate', 'optim.power'),
              lambda v: _is_number(v) and v > 0, 'a number > 0')
  _check_each(config, ('optim.momentum',), lambda v: _is_number(v) and 0 <= v < 1,
              'a number in [0, 1)')

  multi_grid = _get(config, 'model.multi_grid')
  _check(isinstance(multi_grid, (tuple, list)) and all(_is_int(g) and g > 0 for g in multi_grid),
         'model.multi_grid', f'must be a tuple of positive ints (or () for off), got {multi_grid!r}')

  modality, in_channels = config.data.modality, config.model.in_channels
  _check(IN_CHANNELS_BY_MODALITY[modality] == in_channels, 'model.in_channels',
         f'is {in_channels} but config.data.modality={modality!r} feeds '
         f'{IN_CHANNELS_BY_MODALITY[modality]} channels (nrgb: 4; rgb, nir: 3)')
  version, num_classes = config.data.version, config.model.num_classes
  _check(NUM_CLASSES_BY_VERSION[version] == num_classes, 'model.num_classes',
         f'is {num_classes} but config.data.version={version!r} has '
         f'{NUM_CLASSES_BY_VERSION[version]} classes')
  _check(config.data.image_size % config.model.output_stride == 0, 'data.image_size',
         f'({config.data.image_size}) must be a multiple of config.model.output_stride '
         f'({config.model.output_stride})')
  _check(isinstance(config.data.data_dir, str) and config.data.data_dir != '', 'data.data_dir',
         "must name the dataset folder (for source 'synthetic': where it is generated)")
  if config.data.source == 'synthetic':
    size = _get(config, 'data.synthetic.size')
    _check(size == config.data.image_size, 'data.synthetic.size',
           f'({size}) must equal config.data.image_size ({config.data.image_size})')
  for field in ('data.batch_size', 'data.eval_batch_size'):
    size = _get(config, field)
    _check(size % device_count == 0, field,
           f'({size}) must be divisible by the number of devices ({device_count})')
    _check(size % process_count == 0, field,
           f'({size}) must be divisible by the number of processes ({process_count})')

  optim = config.optim
  total = optim.warmup_steps + optim.constant_steps + optim.decay_steps
  _check(config.num_train_steps <= total, 'num_train_steps',
         f'({config.num_train_steps}) must not exceed config.optim.warmup_steps + constant_steps'
         f' + decay_steps ({total}): the poly schedule ends there')

  init_from = _get(config, 'init_from')
  _check(isinstance(init_from, str), 'init_from', f'must be a path or empty, got {init_from!r}')
  if init_from and not os.path.isdir(init_from):
    raise FileNotFoundError(f'config.init_from: no such directory: {init_from}')
