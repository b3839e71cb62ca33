"""The experiment config contract: one table of rules (``RULES``), checked before any compute.

``validate`` is the only place a config is checked: every field of
``agrivision_jax/configs/common.py`` has one rule here (allowed values or type and range), a
field that is not in the table is refused, and the checks that join several fields follow. The
model's input channels and class count are not config fields: ``in_channels(config)`` and
``num_classes(config)`` derive them from ``data.modality`` and ``data.version``.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
from etils import epath

from agrivision_jax import tta
from agrivision_jax.data import layout
from agrivision_jax.data import pipeline
from agrivision_jax.data import sources
from agrivision_jax.models import CONV_IMPLS
from agrivision_jax.models import DTYPES
from agrivision_jax.models.resnet import ARCH_LAYERS
from agrivision_jax.models.resnet import IBN_MODES
from agrivision_jax.models.resnet import NUM_MULTI_GRID_BLOCKS

DIVERGENCE_PAIRINGS = ('replicate', 'zero')
DIVERGENCE_POOLINGS = ('image', 'batch')
RESTORE_WORDS = ('latest', 'best')
# field.band_order letters: R, G, B, N (near-infrared), A (alpha: 0 = nodata), X (a band to ignore).
BAND_LETTERS = 'RGBNAX'
REQUIRED_BANDS = {'nrgb': 'RGBN', 'rgb': 'RGB', 'nir': 'N'}
SCRATCH = 'scratch'
# ImageNet weights each row starts from: (ibn_mode, depth) -> file name. torchvision for plain
# ResNets; IBN-Net (XingangPan/IBN-Net releases) for the others; IBN-s and IBN-ab load IBN-a's
# and keep the parameters IBN-a lacks (SN mixing weights, IN after the add) fresh.
IMAGENET_WEIGHTS = {
    ('none', '50'): 'resnet50-19c8e357.pth', ('none', '101'): 'resnet101-5d3b4d8f.pth',
    **{(mode, depth): f'resnet{depth}_ibn_a.pth' for mode in ('a', 's', 'ab')
       for depth in ('50', '101')},
    ('b', '50'): 'resnet50_ibn_b.pth', ('b', '101'): 'resnet101_ibn_b.pth',
}
_NO_WEIGHTS = (f'has no published ImageNet weights: pass --config.init_from={SCRATCH} or a '
               'converted weights directory')
_ROW_FILES = {'none': 'resnet', 'a': 'ibn_a', 'b': 'ibn_b', 's': 'ibn_s', 'ab': 'ibn_a'}


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one field accepts: ``test(value)`` and the words naming it in the error."""
  test: Callable[[Any], bool]
  allowed: str


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def choice(values: tuple) -> Rule:
  """One of ``values``, of the same type (so True is not 1 and '16' is not 16)."""
  return Rule(lambda v: any(v == c and type(v) is type(c) for c in values),
              f'one of {list(values)}')


def int_at_least(low: int) -> Rule:
  return Rule(lambda v: _is_int(v) and v >= low,
              'a positive int' if low == 1 else f'an int >= {low}')


def number_at_least(low: float, strict: bool = False) -> Rule:
  return Rule(lambda v: _is_number(v) and (v > low if strict else v >= low),
              f"a number {'>' if strict else '>='} {low:g}")


BOOL = Rule(lambda v: isinstance(v, bool), 'True or False')
STRING = Rule(lambda v: isinstance(v, str), 'a string')
POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)
SPLIT = choice(layout.SPLITS)
TTA = choice(tta.TTA_MODES)

RULES: dict[str, Rule] = {
    'seed': Rule(lambda v: _is_int(v) and 0 <= v < 2**32, 'an int in [0, 2**32)'),
    'model.arch': choice(tuple(ARCH_LAYERS)),
    'model.ibn_mode': choice(IBN_MODES),
    'model.output_stride': choice((8, 16, 32)),
    'model.multi_grid': Rule(
        lambda v: isinstance(v, (tuple, list)) and len(v) in (0, NUM_MULTI_GRID_BLOCKS)
        and all(_is_int(g) and g > 0 for g in v),
        f'() (off) or {NUM_MULTI_GRID_BLOCKS} positive ints such as (1, 2, 4)'),
    'model.num_low_level_features': choice((1, 3)),
    'model.dtype': choice(tuple(DTYPES)),
    'model.width': POSITIVE_INT,
    'model.aspp_channels': POSITIVE_INT,
    'model.decoder_channels': POSITIVE_INT,
    'model.low_level_channels': POSITIVE_INT,
    'model.conv_impl': choice(CONV_IMPLS),
    'model.sn_group_size': NON_NEGATIVE_INT,
    'data.source': choice(sources.SOURCES),
    'data.data_dir': STRING,
    'data.version': choice(tuple(layout.CLASS_NAMES)),
    'data.modality': choice(tuple(pipeline.MODALITIES)),
    'data.image_size': POSITIVE_INT,
    'data.batch_size': POSITIVE_INT,
    'data.eval_batch_size': POSITIVE_INT,
    'data.num_workers': NON_NEGATIVE_INT,
    'data.on_bad_example': choice(layout.BAD_EXAMPLE_POLICIES),
    'data.augment.shift_scale_aspect': BOOL,
    'data.augment.hflip': BOOL,
    'data.augment.vflip': BOOL,
    'data.augment.rot90': BOOL,
    'data.synthetic.num_train': POSITIVE_INT,
    'data.synthetic.num_val': POSITIVE_INT,
    'data.synthetic.num_test': POSITIVE_INT,
    'data.synthetic.size': int_at_least(16),
    'data.synthetic.seed': NON_NEGATIVE_INT,
    'loss.lambda_dice': number_at_least(0),
    'loss.lambda_lovasz': number_at_least(0),
    'loss.lovasz_per_image': BOOL,
    'loss.dice_per_class': BOOL,
    'loss.bce_over_all_pixels': BOOL,
    'loss.group_size': NON_NEGATIVE_INT,
    'optim.learning_rate': number_at_least(0, strict=True),
    'optim.momentum': Rule(lambda v: _is_number(v) and 0 <= v < 1, 'a number in [0, 1)'),
    'optim.weight_decay': number_at_least(0),
    'optim.warmup_steps': NON_NEGATIVE_INT,
    'optim.constant_steps': NON_NEGATIVE_INT,
    'optim.decay_steps': POSITIVE_INT,
    'optim.power': number_at_least(0, strict=True),
    'num_train_steps': POSITIVE_INT,
    'log_every_steps': POSITIVE_INT,
    'eval_every_steps': POSITIVE_INT,
    'checkpoint_every_steps': POSITIVE_INT,
    'max_checkpoints_to_keep': POSITIVE_INT,
    'init_from': Rule(lambda v: isinstance(v, str),
                      f"a converted weights directory, '{SCRATCH}' or empty"),
    # --config.restore=4 arrives as the string '4' (the field's default is a string).
    'restore': Rule(lambda v: (v in RESTORE_WORDS or v.isdigit()) if isinstance(v, str) else
                    (_is_int(v) and v >= 0), f'{list(RESTORE_WORDS)} or a step (int >= 0)'),
    'distributed': BOOL,
    'divergence.split': SPLIT,
    'divergence.num_images': NON_NEGATIVE_INT,
    'divergence.batch_size': POSITIVE_INT,
    'divergence.valid_only': BOOL,
    'divergence.random_init': BOOL,
    'divergence.pairing': choice(DIVERGENCE_PAIRINGS),
    'divergence.var_floor': number_at_least(0),
    'divergence.pooling': choice(DIVERGENCE_POOLINGS),
    'predict.split': SPLIT,
    'predict.tta': TTA,
    'predict.num_overlays': NON_NEGATIVE_INT,
    'predict.batch_size': POSITIVE_INT,
    'field.inputs': STRING,
    'field.output_dir': STRING,
    'field.band_order': Rule(
        lambda v: (isinstance(v, str) and v != '' and set(v) <= set(BAND_LETTERS)
                   and all(v.count(c) == 1 for c in v if c != 'X')),
        f"one letter per file band from {BAND_LETTERS!r} (R, G, B, NIR, alpha, ignored), each "
        "once but X, e.g. 'RGBN' or 'BGRNA'"),
    'field.overlap': NON_NEGATIVE_INT,
    'field.tta': TTA,
    'field.batch_size': POSITIVE_INT,
    'field.nodata': Rule(lambda v: _is_number(v) and (v == -1 or v >= 0),
                         "-1 (the files' nodata tags) or a value >= 0"),
    'field.preview_size': POSITIVE_INT,
}
_REMOVED = {
    'model.in_channels': 'the input channels follow config.data.modality (nrgb 4, rgb 3, nir 3)',
    'model.num_classes': 'the class count follows config.data.version (2020: 7, 2021: 9)',
    'data.augment.shift_scale_rotate': 'renamed config.data.augment.shift_scale_aspect',
}


def in_channels(config: ml_collections.ConfigDict) -> int:
  """Image channels the model reads: 4 for data.modality 'nrgb', 3 for 'rgb' and 'nir'."""
  return len(pipeline.MODALITIES[config.data.modality])


def num_classes(config: ml_collections.ConfigDict) -> int:
  """Classes (background included) of data.version: 7 for '2020', 9 for '2021'."""
  return len(layout.class_names(config.data.version))


def model_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.model`` as a plain dict with the derived ``in_channels`` and ``num_classes``: the
  whole description of the network, as the converter and its manifests record it."""
  return {**config.model.to_dict(), 'in_channels': in_channels(config),
          'num_classes': num_classes(config)}


def depth(config: ml_collections.ConfigDict) -> str:
  """'20', '50' or '101' from config.model.arch."""
  return config.model.arch.removeprefix('resnet')


def imagenet_weights(config: ml_collections.ConfigDict) -> str:
  """File name of the ImageNet weights the row of ``config`` starts from.

  torchvision ``resnet50-19c8e357.pth`` / ``resnet101-5d3b4d8f.pth`` for ibn_mode 'none';
  IBN-Net ``resnet{50,101}_ibn_a.pth`` for 'a', 's' and 'ab'; ``resnet{50,101}_ibn_b.pth``
  for 'b'.

  Raises:
    ValueError: for resnet20, which has no published ImageNet weights.
  """
  if not has_imagenet_weights(config):
    raise ValueError(f'config.model.arch {config.model.arch!r} {_NO_WEIGHTS}')
  return IMAGENET_WEIGHTS[(config.model.ibn_mode, depth(config))]


def has_imagenet_weights(config: ml_collections.ConfigDict) -> bool:
  """Whether published ImageNet weights exist for the row (not for resnet20)."""
  return (config.model.ibn_mode, depth(config)) in IMAGENET_WEIGHTS


def convert_command(config: ml_collections.ConfigDict) -> str:
  """The scripts/convert_torch_weights.py command that makes ``init_from`` for this row."""
  variants = f'depth={depth(config)}'
  if config.data.modality != 'nrgb':
    variants += f',modality={config.data.modality}'
  override = ' --config.model.ibn_mode=ab' if config.model.ibn_mode == 'ab' else ''
  return (f'python scripts/convert_torch_weights.py '
          f'--config=configs/{_ROW_FILES[config.model.ibn_mode]}.py:{variants}{override} '
          f'--input={imagenet_weights(config)} --output=<dir>')


def _fail(field: str, message: str) -> None:
  raise ValueError(f'config.{field} {message}')


def _check(condition: bool, field: str, message: str) -> None:
  if not condition:
    _fail(field, message)


def _leaves(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  names = []
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      names += _leaves(value, f'{prefix}{key}.')
    else:
      names.append(f'{prefix}{key}')
  return names


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value = config
  for part in field.split('.'):
    if not isinstance(value, (ml_collections.ConfigDict, dict)) or part not in value:
      raise ValueError(f'config.{field} is missing')
    value = value[part]
  return value


def _check_fields(config: ml_collections.ConfigDict) -> None:
  """Every rule's field is present and allowed; no field lies outside the table."""
  for field in _leaves(config):
    if field not in RULES:
      reason = _REMOVED.get(field, 'not a field of the config (agrivision_jax/configs/common.py)')
      raise ValueError(f'config.{field} is unknown: {reason}')
  for field, rule in RULES.items():
    value = _get(config, field)
    _check(rule.test(value), field, f'must be {rule.allowed}, got {value!r}')


def _check_group(config, field: str, batch_fields: tuple[str, ...], device_count: int) -> None:
  """A group of ``size`` images (0 = the global batch) tiles each batch without straddling a
  device: it divides the batch, and it divides or is a multiple of the per-device batch."""
  size = _get(config, field)
  if size == 0:
    return
  for batch_field in batch_fields:
    batch = _get(config, batch_field)
    per_device = batch // device_count
    _check(batch % size == 0 and (per_device % size == 0 or size % per_device == 0), field,
           f'({size}) must divide config.{batch_field} ({batch}) into whole groups that do not '
           f'straddle a device ({per_device} images per device on {device_count} devices); '
           '0 = the whole batch')


def validate(config: ml_collections.ConfigDict, device_count: int = 1,
             process_count: int = 1, *, training: bool = True) -> None:
  """Checks every field of the contract (``RULES``) and their combinations.

  Args:
    config: the experiment config (``agrivision_jax.configs.common.get_config``).
    device_count: devices the global batch is sharded over (``jax.device_count()``).
    process_count: processes that each load ``batch_size // process_count`` examples.
    training: the run trains, so a full-size run must name its initial weights (``init_from``);
      the other modes restore the workdir's checkpoint.

  Raises:
    ValueError: naming the first bad, missing or unknown field (or pair of fields) and the
      allowed values; a full-size run without ``init_from`` names the ImageNet weight file and
      the conversion command.
    FileNotFoundError: ``config.init_from`` names a directory that does not exist.
  """
  _check_fields(config)
  data = config.data
  _check(data.image_size % config.model.output_stride == 0, 'data.image_size',
         f'({data.image_size}) must be a multiple of config.model.output_stride '
         f'({config.model.output_stride})')
  if not data.data_dir:
    _fail('data.data_dir', "is empty: pass --config.data.data_dir=<folder holding the "
          "Agriculture-Vision train/ val/ test/ folders> (or the TFDS data_dir with "
          "--config.data.source=tfds), or use the :demo variant (synthetic data), e.g. "
          "--config=configs/ibn_s.py:demo")
  if data.source == 'synthetic':
    _check(data.synthetic.size == data.image_size, 'data.synthetic.size',
           f'({data.synthetic.size}) must equal config.data.image_size ({data.image_size})')
  for field in ('data.batch_size', 'data.eval_batch_size'):
    size = _get(config, field)
    _check(size % device_count == 0, field,
           f'({size}) must be divisible by the number of devices ({device_count})')
    _check(size % process_count == 0, field,
           f'({size}) must be divisible by the number of processes ({process_count})')
  # SN statistics groups matter in training only (eval uses running statistics); loss groups in
  # training and in the eval loss.
  _check_group(config, 'model.sn_group_size', ('data.batch_size',), device_count)
  _check_group(config, 'loss.group_size', ('data.batch_size', 'data.eval_batch_size'),
               device_count)
  optim = config.optim
  total = optim.warmup_steps + optim.constant_steps + optim.decay_steps
  _check(config.num_train_steps <= total, 'num_train_steps',
         f'({config.num_train_steps}) must not exceed config.optim.warmup_steps + constant_steps'
         f' + decay_steps ({total}): the poly schedule ends there')
  if config.field.inputs:  # the field mode's settings, checked against the model's tile
    needed = REQUIRED_BANDS[data.modality]
    _check(set(needed) <= set(config.field.band_order), 'field.band_order',
           f'({config.field.band_order!r}) must include {needed!r} for config.data.modality='
           f'{data.modality!r}')
    _check(config.field.overlap < data.image_size, 'field.overlap',
           f'({config.field.overlap}) must be smaller than config.data.image_size '
           f'({data.image_size}), the window size')

  init_from = config.init_from
  if training and not init_from and data.source != 'synthetic':
    _check(has_imagenet_weights(config), 'init_from',
           f'is empty and {config.model.arch} {_NO_WEIGHTS}')
    _fail('init_from', f'is empty: a full-size run starts from ImageNet weights; download '
          f'{imagenet_weights(config)} and convert it with `{convert_command(config)}`, then '
          f"pass --config.init_from=<dir>; or pass --config.init_from={SCRATCH} to train from "
          'random initialisation')
  if init_from and init_from != SCRATCH and not epath.Path(init_from).is_dir():
    raise FileNotFoundError(f'config.init_from: no such directory: {init_from}')
