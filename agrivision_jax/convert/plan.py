"""Recognising a source layout and planning the conversion: used, ignored, filled and fresh."""
import dataclasses
import functools
import json
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from agrivision_jax import models
from agrivision_jax.convert.files import as_numpy
from agrivision_jax.convert.names import (DROPPED_LEAVES, Path, apply_transform,
                                          flat_variables, flax_path_to_torch_key, join_path,
                                          layout_transform, match_key, torch_key_to_module_path,
                                          unflatten)


DEEPLAB_MODULES = ('backbone', 'aspp', 'decoder')

VARIANT_NAMES = {
    'none': 'plain ResNet (torchvision)',
    'a': 'IBN-a (IBN-Net)',
    'b': 'IBN-b (IBN-Net)',
    's': 'IBN-s (SwitchableNorm)',
    'ab': 'IBN-ab (IBN-a + IBN-b)',
}
# config.model.ibn_mode -> ibn variants of an ImageNet backbone file that it accepts.
ACCEPTED_BACKBONE_VARIANTS = {
    'none': ('none',),
    'a': ('a',),
    'b': ('b',),
    's': ('a', 's'),
    'ab': ('a', 'ab'),
}
# Blocks in stage 3 -> arch (stage 4 always has 3 blocks).
_ARCH_BY_STAGE3_BLOCKS = {1: 'resnet20', 6: 'resnet50', 23: 'resnet101'}
# config.model fields that decide the variable shapes: always, and for the head as well.
BACKBONE_FIELDS = ('arch', 'ibn_mode', 'in_channels', 'width')
HEAD_FIELDS = ('num_classes', 'num_low_level_features', 'aspp_channels', 'decoder_channels',
               'low_level_channels')

_REASON_COUNTER = 'BatchNorm batch counter: no Flax counterpart'
_REASON_FC = 'ImageNet classifier: not part of the segmentation model'
_REASON_IN_STATS = ('InstanceNorm running statistic (PyTorch < 0.4 file): unused, InstanceNorm '
                    'normalises with per-image statistics')
_REASON_IBN_FOR_SN = ('IBN-a IN|BN split where the model has a SwitchableNorm: not loaded (the '
                      "SwitchableNorm stays freshly initialised, as the authors' loader does)")
_REASON_HEAD = 'DeepLabV3+ head: not part of an ImageNet backbone file'
_REASON_SN = ("SwitchableNorm: IBN-a files have none; freshly initialised (the authors' "
              'behaviour)')
_REASON_POST_ADD_IN = ('IBN-b InstanceNorm after the residual add: IBN-a files have none; '
                       'freshly initialised')


@dataclasses.dataclass(frozen=True)
class SourceLayout:
  """What a state_dict's keys say it is.

  Attributes:
    kind: 'imagenet' (a ResNet backbone file) or 'deeplab' (the authors' full model).
    ibn_variant: 'none' | 'a' | 'b' | 's' | 'ab' of the backbone keys.
    arch: 'resnet20' / 'resnet50' / 'resnet101' from the stage-3 block count, None if neither.
    in_channels: input channels of the first conv, None without one.
    width: stem width (first conv's output channels), None without one.
  """
  kind: str
  ibn_variant: str
  arch: str | None
  in_channels: int | None
  width: int | None

  def description(self) -> str:
    """e.g. 'ImageNet backbone, IBN-a (IBN-Net), resnet50, 3 input channels, width 64'."""
    kind = 'ImageNet backbone' if self.kind == 'imagenet' else 'DeepLabV3+ checkpoint'
    return (f'{kind}, {VARIANT_NAMES[self.ibn_variant]}, {self.arch or "unknown depth"}, '
            f'{self.in_channels} input channels, width {self.width}')


def describe_source(shapes: Mapping[str, tuple[int, ...]], name: str = 'state_dict'
                    ) -> SourceLayout:
  """Recognises an ImageNet ResNet / IBN-Net or an authors' DeepLabV3+ state_dict from its keys.

  Args:
    shapes: torch key -> tensor shape (wrapper and 'module.' prefix already removed).
    name: the file, for error messages.
  Returns:
    The ``SourceLayout``.
  Raises:
    ValueError naming ``name`` when the keys are neither layout or mix IBN variants.
  """
  keys = list(shapes)
  if any(key.split('.')[0] in DEEPLAB_MODULES for key in keys):
    kind = 'deeplab'
    backbone = {key[len('backbone.'):]: shape for key, shape in shapes.items()
                if key.startswith('backbone.')}
  elif 'conv1.weight' in shapes or any(key.startswith('layer1.') for key in keys):
    kind, backbone = 'imagenet', dict(shapes)
  else:
    raise ValueError(
        f'{name}: no recognised layout: expected ResNet / IBN-Net keys (conv1.weight, '
        f'layer1.0.conv1.weight, ...) or DeepLabV3+ keys (backbone.*, aspp.*, decoder.*); '
        f'first keys: {keys[:5]}')
  has = lambda pattern: any(re.fullmatch(pattern, key) for key in backbone)  # noqa: E731
  sn = has(r'layer\d+\.\d+\.bn1\.mean_weight')
  ibn = has(r'layer\d+\.\d+\.bn1\.IN\.weight')
  post_add_in = has(r'layer\d+\.\d+\.IN\.weight')
  if sn and (ibn or post_add_in):
    raise ValueError(f'{name}: mixes SwitchableNorm and IBN layers in the backbone: no model '
                     'here has that layout')
  variant = 's' if sn else {(True, True): 'ab', (True, False): 'a', (False, True): 'b',
                            (False, False): 'none'}[(ibn, post_add_in)]
  stage3 = {key.split('.')[1] for key in backbone if key.startswith('layer3.')}
  conv1 = backbone.get('conv1.weight')
  return SourceLayout(kind, variant, _ARCH_BY_STAGE3_BLOCKS.get(len(stage3)),
                      conv1[1] if conv1 is not None and len(conv1) == 4 else None,
                      conv1[0] if conv1 is not None and len(conv1) == 4 else None)


# ----------------------------------------------------------------------------- planning


def model_config_dict(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """``config.model`` as a plain JSON-able dict (tuples as lists)."""
  raw = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
  return json.loads(json.dumps(raw))


@functools.lru_cache(maxsize=16)
def _cached_template(config_json: str) -> dict[Path, jax.ShapeDtypeStruct]:
  model_config = json.loads(config_json)
  model = models.model_from_spec(model_config)
  images = jax.ShapeDtypeStruct((1, models.INIT_SIZE, models.INIT_SIZE,
                                 model_config['in_channels']), jnp.float32)
  template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return flat_variables(template)


def variable_shapes(model_config: Mapping[str, Any]) -> dict[Path, jax.ShapeDtypeStruct]:
  """Every variable of the network ``model_config`` describes: path -> ShapeDtypeStruct (no
  compute).

  Args:
    model_config: ``configuration.model_spec(config)``: ``config.model``'s fields with
      ``in_channels`` and ``num_classes``.
  """
  return _cached_template(json.dumps(model_config_dict(model_config), sort_keys=True))


@dataclasses.dataclass(frozen=True)
class Plan:
  """Where every source tensor goes and which leaves stay fresh (shapes only, no data).

  Attributes:
    layout: what the source is.
    used: torch key -> (flax path, transform name).
    ignored: torch key -> reason.
    fresh: flax path -> reason.
    notes: remarks on special transforms (the NIR filter).
  """
  layout: SourceLayout
  used: dict[str, tuple[Path, str]]
  ignored: dict[str, str]
  fresh: dict[Path, str]
  notes: tuple[str, ...]


def _is_sn(module: Path, flat_template: Mapping[Path, Any]) -> bool:
  return ('params',) + module + ('mean_weight',) in flat_template


def _is_instance_norm(module: Path, flat_template: Mapping[Path, Any]) -> bool:
  return (('params',) + module + ('scale',) in flat_template
          and ('batch_stats',) + module + ('mean',) not in flat_template
          and not _is_sn(module, flat_template))


def _ignore_reason(key: str, mapped_key: str, layout: SourceLayout,
                   flat_template: Mapping[Path, Any], sn_from_ibn_a: bool) -> str | None:
  module, leaf = torch_key_to_module_path(mapped_key)
  if leaf in DROPPED_LEAVES:
    return _REASON_COUNTER
  if layout.kind == 'imagenet' and key.split('.')[0] == 'fc':
    return _REASON_FC
  if (sn_from_ibn_a and len(module) >= 2 and module[-1] in ('IN', 'BN')
      and _is_sn(module[:-1], flat_template)):
    return _REASON_IBN_FOR_SN
  if leaf in ('running_mean', 'running_var') and _is_instance_norm(module, flat_template):
    return _REASON_IN_STATS
  return None


def _fresh_reason(path: Path, layout: SourceLayout, flat_template: Mapping[Path, Any],
                  sn_from_ibn_a: bool, in_from_ibn_a: bool) -> str | None:
  if layout.kind == 'imagenet' and path[1] != 'backbone':
    return _REASON_HEAD
  if sn_from_ibn_a and _is_sn(path[1:-1], flat_template):
    return _REASON_SN
  if in_from_ibn_a and len(path) == 5 and path[1] == 'backbone' and path[3] == 'IN':
    return _REASON_POST_ADD_IN
  return None


def _config_summary(model_config: Mapping[str, Any]) -> str:
  config = model_config_dict(model_config)
  return ', '.join(f'{field}={config.get(field)!r}' for field in BACKBONE_FIELDS)


def _check_variant(layout: SourceLayout, model_config: Mapping[str, Any], name: str) -> None:
  mode = model_config['ibn_mode']
  if layout.kind == 'deeplab' and layout.ibn_variant != mode:
    raise ValueError(
        f'{name}: a DeepLabV3+ checkpoint with a {VARIANT_NAMES[layout.ibn_variant]} backbone '
        f'cannot be converted for config.model.ibn_mode={mode!r}: a full checkpoint converts '
        f'only to the ibn_mode it was trained with ({layout.ibn_variant!r})')
  accepted = ACCEPTED_BACKBONE_VARIANTS.get(mode, ())
  if layout.kind == 'imagenet' and layout.ibn_variant not in accepted:
    raise ValueError(
        f'{name}: an ImageNet {VARIANT_NAMES[layout.ibn_variant]} backbone cannot initialise '
        f'config.model.ibn_mode={mode!r}, which accepts '
        + ' or '.join(VARIANT_NAMES[v] for v in accepted) + ' backbone files')


def plan_conversion(shapes: Mapping[str, tuple[int, ...]], model_config: Mapping[str, Any],
                    name: str = 'state_dict') -> Plan:
  """Accounts for every source tensor and every flax leaf (module doc), from shapes alone.

  Args:
    shapes: torch key -> shape (wrapper and 'module.' prefix removed).
    model_config: ``config.model``.
    name: the file, for error messages.
  Returns:
    The ``Plan``.
  Raises:
    ValueError naming ``name``: an unrecognised layout or an ibn variant the config does not
      accept; otherwise one error listing every unknown key, shape mismatch and missing key.
  """
  shapes = {key: tuple(int(d) for d in shape) for key, shape in shapes.items()}
  layout = describe_source(shapes, name)
  flat_template = variable_shapes(model_config)
  _check_variant(layout, model_config, name)
  imagenet = layout.kind == 'imagenet'
  sn_from_ibn_a = imagenet and layout.ibn_variant == 'a' and model_config['ibn_mode'] == 's'
  in_from_ibn_a = imagenet and layout.ibn_variant == 'a' and model_config['ibn_mode'] == 'ab'
  used: dict[str, tuple[Path, str]] = {}
  ignored: dict[str, str] = {}
  unknown, mismatched, notes = [], [], []
  mismatched_paths = set()
  for key, shape in shapes.items():
    mapped_key = f'backbone.{key}' if imagenet else key
    reason = _ignore_reason(key, mapped_key, layout, flat_template, sn_from_ibn_a)
    if reason:
      ignored[key] = reason
      continue
    path = match_key(mapped_key, flat_template)
    if path is None:
      unknown.append(f'unknown key: {key} {shape}')
      continue
    target = tuple(flat_template[path].shape)
    transform, converted = layout_transform(path, shape, target, nir_from_r=True)
    if converted != target:
      mismatched_paths.add(path)
      mismatched.append(f'shape mismatch: {key} {shape} -> {join_path(path)} expects {target}'
                        + (f' (after {transform})' if transform != 'copy' else ''))
      continue
    if 'NIR' in transform:
      notes.append(f'{key} {shape}: 3-channel file for in_channels=4; the 4th input filter '
                   '(NIR) is a copy of the R filter (input order R, G, B, NIR)')
    used[key] = (path, transform)
  filled = {path for path, _ in used.values()}
  fresh: dict[Path, str] = {}
  missing = []
  for path, leaf in flat_template.items():
    if path in filled or path in mismatched_paths:
      continue
    reason = _fresh_reason(path, layout, flat_template, sn_from_ibn_a, in_from_ibn_a)
    if reason:
      fresh[path] = reason
    else:
      key = flax_path_to_torch_key(path)
      key = key[len('backbone.'):] if imagenet else key
      missing.append(f'missing key: {key} (for {join_path(path)} {tuple(leaf.shape)})')
  problems = unknown + mismatched + missing
  if problems:
    found = {'arch': layout.arch, 'width': layout.width, 'in_channels': layout.in_channels}
    hints = [f'the file has {field}={value!r} but config.model.{field}={model_config[field]!r}'
             for field, value in found.items()
             if value is not None and value != model_config[field]
             and not (field == 'in_channels' and (value, model_config[field]) == (3, 4))]
    raise ValueError(
        f'{name} ({layout.description()}) does not fit config.model '
        f'({_config_summary(model_config)}): {len(problems)} problems\n  '
        + '\n  '.join(hints + problems))
  return Plan(layout, used, ignored, fresh, tuple(notes))


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass(frozen=True)
class Conversion:
  """A converted state_dict.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} of the filled leaves only (numpy float32).
    plan: the accounting.
  """
  variables: dict[str, Any]
  plan: Plan

  @property
  def complete(self) -> bool:
    """True when every flax leaf was filled (a full DeepLabV3+ checkpoint)."""
    return not self.plan.fresh


def convert_state_dict(tensors: Mapping[str, Any], model_config: Mapping[str, Any],
                       name: str = 'state_dict') -> Conversion:
  """Converts a state_dict (wrapper and 'module.' prefix removed) for ``create_model(config)``.

  Args:
    tensors: torch key -> array (numpy or torch).
    model_config: ``config.model``.
    name: the file, for error messages.
  Returns:
    The ``Conversion`` (filled leaves + accounting plan).
  Raises:
    ValueError as ``plan_conversion``.
  """
  arrays = {}
  for key, value in tensors.items():
    array = as_numpy(value)
    arrays[key] = np.asarray(value) if array is None else array
  plan = plan_conversion({key: value.shape for key, value in arrays.items()}, model_config, name)
  flat_template = variable_shapes(model_config)
  filled = {path: np.ascontiguousarray(apply_transform(transform, arrays[key]),
                                       dtype=flat_template[path].dtype)
            for key, (path, transform) in plan.used.items()}
  variables = {'params': {}, 'batch_stats': {}}
  variables.update(unflatten(filled))
  return Conversion(variables, plan)
