"""PyTorch weights -> Flax variables for the DeepLabV3+ / IBN-ResNet models.

Name rule (torch key -> flax path), driven by the flax ``template``:

1. Split the key at '.'. Every purely numeric component is joined to the component before it
   with '_': ``backbone.layer1.0.downsample.1.weight`` -> module path
   ``backbone/layer1_0/downsample_1``, leaf ``weight``; ``decoder.bottlenecks.2.0.weight`` ->
   ``decoder/bottlenecks_2_0``; ``aspp.global_avg_pool.1.weight`` -> ``aspp/global_avg_pool_1``.
2. The leaf maps by name:

   ================  ===============================  =============================================
   torch leaf        flax variable                    layout
   ================  ===============================  =============================================
   weight (conv)     params/<path>/kernel             OIHW -> HWIO (transpose 2, 3, 1, 0)
   weight (norm)     params/<path>/scale              flattened to (C,) (SN stores (1, C, 1, 1))
   bias              params/<path>/bias               flattened to (C,)
   running_mean      batch_stats/<path>/mean          flattened to (C,) (SN stores (1, C, 1))
   running_var       batch_stats/<path>/var           flattened to (C,)
   mean_weight       params/<path>/mean_weight        as is (SN)
   var_weight        params/<path>/var_weight         as is (SN)
   num_batches_tracked  (dropped: no flax counterpart)
   ================  ===============================  =============================================

   A ``weight`` is a conv kernel when the template has ``<path>/kernel`` and a norm scale when it
   has ``<path>/scale``.

``state_dict_to_variables`` applies this rule strictly to any template (every key lands on a leaf
of the template's shape, every leaf is filled). On top of it, ``convert_file`` turns a checkpoint
file into a directory that ``load_variables`` reads:

* Files: ``.pth`` / ``.pt`` / ``.pth.tar`` (``torch.load(weights_only=True)``; torch is imported
  only for these) and ``.safetensors`` (numpy API, no torch). A ``{'state_dict': ...}`` or
  ``{'model': ...}`` wrapper is unwrapped (its other entries, e.g. ``epoch``, are ignored and
  reported) and a ``module.`` prefix on every key (DataParallel / DDP) is stripped.
* Layouts: an ImageNet backbone (torchvision ``conv1``, ``bn1``, ``layerL.i.*``, ``fc.*``; IBN-Net
  ``layerL.i.bn1.IN|BN.*``, IBN-b's ``layerL.i.IN.*`` and InstanceNorm stem ``bn1``) converts to
  the backbone only; a DeepLabV3+ checkpoint of the authors' code (``backbone.*``, ``aspp.*``,
  ``decoder.*``) converts to every variable.
* Which file a ``config.model.ibn_mode`` accepts (``ACCEPTED_BACKBONE_VARIANTS``):

  ========  ==========================  ================================================
  ibn_mode  ImageNet backbone file      left freshly initialised (listed in the report)
  ========  ==========================  ================================================
  none      torchvision ResNet          the DeepLabV3+ head
  a         IBN-Net IBN-a               the head
  b         IBN-Net IBN-b               the head
  s         IBN-a (or IBN-s)            the head; from IBN-a also every SwitchableNorm
                                        (the IBN-a IN|BN tensors there are ignored), as
                                        the authors' loader does
  ab        IBN-a (or IBN-ab)           the head; from IBN-a also the InstanceNorm after
                                        the add of the last block of stages 1 and 2
  ========  ==========================  ================================================

  A DeepLabV3+ checkpoint converts only to the ibn_mode it was trained with, and fills everything.
* A 3-channel file for an ``in_channels=4`` model: the first conv gets a 4th input filter (NIR)
  copied from its R filter (input order R, G, B, NIR), as the authors' ``convert_model``.
* Strict accounting: every source tensor is used or ignored for a stated reason (``fc.*``,
  ``num_batches_tracked``, InstanceNorm running statistics of PyTorch < 0.4 files, IBN-a norms
  where the model has SN); every flax leaf is filled or fresh for a stated reason. Any other
  unknown key, shape mismatch or missing key is one ValueError listing all of them, and nothing is
  written.

Output directory: ``variables.safetensors`` (the filled leaves, keys ``params/backbone/conv1/
kernel``...), ``manifest.json`` (model config it was converted for, source, filled and fresh
leaves), ``report.json`` and ``report.txt``. It is written to a temporary sibling and renamed.
"""
import dataclasses
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from agrivision_jax import models

_DROPPED_LEAVES = ('num_batches_tracked',)
# torch leaf -> (collection, flax leaf); 'weight' is resolved against the template.
_LEAF_MAP = {
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
    'mean_weight': ('params', 'mean_weight'),
    'var_weight': ('params', 'var_weight'),
}
# flax leaf -> torch leaf (for naming a missing key).
_TORCH_LEAF = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
               'var': 'running_var', 'mean_weight': 'mean_weight', 'var_weight': 'var_weight'}

FORMAT_NAME = 'agrivision_jax.converted_variables'
FORMAT_VERSION = 1
VARIABLES_FILE = 'variables.safetensors'
MANIFEST_FILE = 'manifest.json'
REPORT_JSON_FILE = 'report.json'
REPORT_TEXT_FILE = 'report.txt'
TORCH_SUFFIXES = ('.pth', '.pt', '.pth.tar')
SAFETENSORS_SUFFIXES = ('.safetensors',)
WRAPPER_KEYS = ('state_dict', 'model')
DDP_PREFIX = 'module.'
DEEPLAB_MODULES = ('backbone', 'aspp', 'decoder')
FIRST_CONV = ('params', 'backbone', 'conv1', 'kernel')

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
_ARCH_BY_STAGE3_BLOCKS = {6: 'resnet50', 23: 'resnet101'}
# config.model fields that decide the variable shapes: always, and for the head as well.
BACKBONE_FIELDS = ('arch', 'ibn_mode', 'in_channels', 'width')
HEAD_FIELDS = ('num_classes', 'num_low_level_features', 'aspp_channels', 'decoder_channels',
               'low_level_channels')

Path = tuple[str, ...]

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


def torch_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
  """'backbone.layer1.0.bn1.IN.weight' -> (('backbone', 'layer1_0', 'bn1', 'IN'), 'weight')."""
  parts: list[str] = []
  for part in key.split('.'):
    if part.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{part}'
    else:
      parts.append(part)
  return tuple(parts[:-1]), parts[-1]


def flax_path_to_torch_key(path: Path) -> str:
  """('params', 'decoder', 'bottlenecks_2_0', 'kernel') -> 'decoder.bottlenecks.2.0.weight'."""
  modules = []
  for name in path[1:-1]:
    match = re.fullmatch(r'(.*?)((?:_\d+)+)', name)
    modules.append(match.group(1) + match.group(2).replace('_', '.') if match else name)
  return '.'.join(modules + [_TORCH_LEAF.get(path[-1], path[-1])])


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for name, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (name,)))
    else:
      flat[prefix + (name,)] = value
  return flat


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def _flat_variables(template: Mapping[str, Any]) -> dict[Path, Any]:
  return {(collection,) + path: leaf
          for collection, tree in template.items()
          for path, leaf in _flatten(tree).items()}


def _join(path: Path) -> str:
  return '/'.join(path)


def _match(key: str, flat_template: Mapping[Path, Any]) -> Path | None:
  """The template path that torch ``key`` names (module doc rule), or None."""
  module_path, leaf = torch_key_to_module_path(key)
  if leaf == 'weight':
    kind = 'kernel' if ('params',) + module_path + ('kernel',) in flat_template else 'scale'
    collection, flax_leaf = 'params', kind
  elif leaf in _LEAF_MAP:
    collection, flax_leaf = _LEAF_MAP[leaf]
  else:
    return None
  path = (collection,) + module_path + (flax_leaf,)
  return path if path in flat_template else None


def _transform(path: Path, shape: tuple[int, ...], target: tuple[int, ...],
               nir_from_r: bool) -> tuple[str, tuple[int, ...]]:
  """(transform name, converted shape) of a torch tensor of ``shape`` going to ``path``."""
  if path[-1] == 'kernel' and len(shape) == 4:
    out, cin, kh, kw = shape
    if nir_from_r and path == FIRST_CONV and cin == 3 and target[2:3] == (4,):
      return 'OIHW->HWIO, 4th input filter (NIR) = R filter', (kh, kw, 4, out)
    return 'OIHW->HWIO', (kh, kw, cin, out)
  size = int(np.prod(shape, dtype=np.int64))
  if len(target) == 1 and len(shape) > 1 and size == max(shape):
    return 'flatten', (size,)
  return 'copy', tuple(shape)


def _apply_transform(transform: str, value: np.ndarray) -> np.ndarray:
  if transform.startswith('OIHW->HWIO'):
    if 'NIR' in transform:
      value = np.concatenate([value, value[:, :1]], axis=1)
    return np.transpose(value, (2, 3, 1, 0))
  if transform == 'flatten':
    return value.reshape(-1)
  return value


def state_dict_to_variables(state_dict: Mapping[str, Any],
                            template: Mapping[str, Any]) -> dict[str, Any]:
  """Maps a PyTorch state_dict onto the flax variable tree of ``template`` (see module doc).

  Args:
    state_dict: torch key -> array (numpy, or anything ``np.asarray`` accepts).
    template: {'params': ..., 'batch_stats': ...} of arrays or ``jax.ShapeDtypeStruct``
      (``jax.eval_shape`` of ``model.init`` is enough).
  Returns:
    Variables with the template's structure, shapes and dtypes (numpy arrays).
  Raises:
    ValueError listing every unmatched key, every shape mismatch and every unfilled leaf.
  """
  flat_template = _flat_variables(template)
  filled: dict[Path, np.ndarray] = {}
  unmatched, mismatched = [], []
  for key, value in state_dict.items():
    if torch_key_to_module_path(key)[1] in _DROPPED_LEAVES:
      continue
    path = _match(key, flat_template)
    if path is None:
      unmatched.append(key)
      continue
    target = flat_template[path]
    value = np.asarray(value)
    transform, shape = _transform(path, value.shape, tuple(target.shape), nir_from_r=False)
    if shape != tuple(target.shape):
      mismatched.append(f'{key} {value.shape} -> {_join(path)} expects {tuple(target.shape)}')
      continue
    filled[path] = _apply_transform(transform, value).astype(target.dtype)
  unfilled = sorted(_join(path) for path in flat_template if path not in filled)
  if unmatched or mismatched or unfilled:
    lines = ([f'unmatched torch key: {key}' for key in unmatched]
             + [f'shape mismatch: {entry}' for entry in mismatched]
             + [f'unfilled flax leaf: {path}' for path in unfilled])
    raise ValueError('state_dict does not match the model:\n  ' + '\n  '.join(lines))
  return _unflatten(filled)


# ----------------------------------------------------------------------------- reading files


@dataclasses.dataclass(frozen=True)
class SourceFile:
  """A checkpoint file's state_dict and how it was unwrapped.

  Attributes:
    path: the file.
    container: 'torch' or 'safetensors'.
    wrapper: 'state_dict' / 'model' when the state_dict was wrapped in such a dict, else None.
    wrapper_entries: the wrapper's other top-level entries (e.g. 'epoch'), ignored.
    prefix: 'module.' when it was stripped from every key, else None.
    tensors: torch key -> numpy array (floating tensors as float32).
  """
  path: str
  container: str
  wrapper: str | None
  wrapper_entries: tuple[str, ...]
  prefix: str | None
  tensors: dict[str, np.ndarray]


def _as_numpy(value: Any) -> np.ndarray | None:
  """A numpy array from a numpy or torch tensor (floating -> float32); None for anything else."""
  if isinstance(value, np.ndarray):
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
  if type(value).__module__.startswith('torch') and hasattr(value, 'detach'):
    tensor = value.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).numpy()
  return None


def _read_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top (optional dependency, .pth only)
  except ImportError as e:
    raise ValueError(f'{path}: reading a .pth/.pt file needs PyTorch (pip install '
                     "'agrivision_jax[torch]'), or convert the file to .safetensors") from e
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except (torch raises many types here)
    message = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise ValueError(f'{path}: not a checkpoint torch.load(weights_only=True) can read: '
                     f'{type(e).__name__}: {message}') from e


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except (safetensors raises its own types)
    raise ValueError(f'{path}: not a readable .safetensors file: {type(e).__name__}: {e}') from e


def read_checkpoint(path: str) -> SourceFile:
  """Reads a .pth/.pt/.pth.tar (torch) or .safetensors file into a flat state_dict.

  Args:
    path: the checkpoint file.
  Returns:
    A ``SourceFile`` (wrapper removed, 'module.' prefix stripped, tensors as numpy).
  Raises:
    FileNotFoundError: no such file.
    ValueError naming the file: unknown suffix, unreadable file, or content that is not a
      state_dict (a mapping of str keys to tensors, possibly wrapped).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such checkpoint file')
  lower = path.lower()
  if lower.endswith(SAFETENSORS_SUFFIXES):
    container, content = 'safetensors', _read_safetensors(path)
  elif lower.endswith(TORCH_SUFFIXES):
    container, content = 'torch', _read_torch(path)
  else:
    raise ValueError(f'{path}: unknown checkpoint type; expected a file ending in one of '
                     f'{TORCH_SUFFIXES + SAFETENSORS_SUFFIXES}')
  if not isinstance(content, Mapping):
    raise ValueError(f'{path}: not a checkpoint: it holds a {type(content).__name__}, not a '
                     'state_dict (a mapping of names to tensors)')
  wrapper, entries = None, ()
  if not all(_as_numpy(v) is not None for v in content.values()):
    inner = [name for name in WRAPPER_KEYS if isinstance(content.get(name), Mapping)]
    if len(inner) == 1:
      wrapper = inner[0]
      entries = tuple(sorted(str(k) for k in content if k != wrapper))
      content = content[wrapper]
  tensors, bad = {}, []
  for key, value in content.items():
    array = _as_numpy(value)
    if not isinstance(key, str) or array is None:
      bad.append(f'{key!r} ({type(value).__name__})')
    else:
      tensors[key] = array
  if bad:
    raise ValueError(f'{path}: not a state_dict: {len(bad)} entries are not tensors: '
                     + ', '.join(bad))
  if not tensors:
    raise ValueError(f'{path}: not a checkpoint: the state_dict is empty')
  prefix = None
  if all(key.startswith(DDP_PREFIX) for key in tensors):
    prefix = DDP_PREFIX
    tensors = {key[len(DDP_PREFIX):]: value for key, value in tensors.items()}
  return SourceFile(path, container, wrapper, entries, prefix, tensors)


# ----------------------------------------------------------------------------- layouts


@dataclasses.dataclass(frozen=True)
class SourceLayout:
  """What a state_dict's keys say it is.

  Attributes:
    kind: 'imagenet' (a ResNet backbone file) or 'deeplab' (the authors' full model).
    ibn_variant: 'none' | 'a' | 'b' | 's' | 'ab' of the backbone keys.
    arch: 'resnet50' / 'resnet101' from the stage-3 block count, None if neither.
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
  model = models.create_model(model_config)
  images = jax.ShapeDtypeStruct((1, models.INIT_SIZE, models.INIT_SIZE,
                                 model_config['in_channels']), jnp.float32)
  template = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  return _flat_variables(template)


def variable_shapes(model_config: Mapping[str, Any]) -> dict[Path, jax.ShapeDtypeStruct]:
  """Every variable of ``create_model(model_config)``: path -> ShapeDtypeStruct (no compute).

  Raises:
    ValueError naming the config.model field for a bad config.
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
  if leaf in _DROPPED_LEAVES:
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
    path = _match(mapped_key, flat_template)
    if path is None:
      unknown.append(f'unknown key: {key} {shape}')
      continue
    target = tuple(flat_template[path].shape)
    transform, converted = _transform(path, shape, target, nir_from_r=True)
    if converted != target:
      mismatched_paths.add(path)
      mismatched.append(f'shape mismatch: {key} {shape} -> {_join(path)} expects {target}'
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
      missing.append(f'missing key: {key} (for {_join(path)} {tuple(leaf.shape)})')
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
    array = _as_numpy(value)
    arrays[key] = np.asarray(value) if array is None else array
  plan = plan_conversion({key: value.shape for key, value in arrays.items()}, model_config, name)
  flat_template = variable_shapes(model_config)
  filled = {path: np.ascontiguousarray(_apply_transform(transform, arrays[key]),
                                       dtype=flat_template[path].dtype)
            for key, (path, transform) in plan.used.items()}
  variables = {'params': {}, 'batch_stats': {}}
  variables.update(_unflatten(filled))
  return Conversion(variables, plan)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def build_report(source: SourceFile, conversion: Conversion, model_config: Mapping[str, Any],
                 output_dir: str) -> dict[str, Any]:
  """The JSON accounting report: input, source layout, counts, used / ignored keys, fresh leaves.

  Returns:
    A JSON-able dict (``report.json``; ``format_report`` renders it as text).
  """
  plan = conversion.plan
  flat_template = variable_shapes(model_config)
  shapes = {key: list(value.shape) for key, value in source.tensors.items()}
  return {
      'input': {'path': os.path.abspath(source.path), 'sha256': _sha256(source.path),
                'container': source.container, 'wrapper': source.wrapper,
                'wrapper_entries_ignored': list(source.wrapper_entries),
                'prefix_stripped': source.prefix},
      'source': {**dataclasses.asdict(plan.layout), 'description': plan.layout.description()},
      'model_config': model_config_dict(model_config),
      'output': {'directory': os.path.abspath(output_dir), 'complete': conversion.complete},
      'counts': {'source_tensors': len(source.tensors), 'used': len(plan.used),
                 'ignored': len(plan.ignored), 'flax_leaves': len(flat_template),
                 'filled': len(plan.used), 'fresh': len(plan.fresh)},
      'notes': list(plan.notes),
      'used': [{'key': key, 'shape': shapes[key], 'leaf': _join(path),
                'leaf_shape': list(flat_template[path].shape), 'transform': transform}
               for key, (path, transform) in plan.used.items()],
      'ignored': [{'key': key, 'shape': shapes[key], 'reason': reason}
                  for key, reason in plan.ignored.items()],
      'fresh': [{'leaf': _join(path), 'shape': list(flat_template[path].shape), 'reason': reason}
                for path, reason in plan.fresh.items()],
  }


def _shape_text(shape) -> str:
  return str(tuple(shape))


def format_report(report: Mapping[str, Any]) -> str:
  """Renders ``build_report``'s dict as the text of report.txt (every key and leaf, one a line)."""
  source, counts, config = report['input'], report['counts'], report['model_config']
  wrapper = (f"{{'{source['wrapper']}': ...}} wrapper (ignored entries: "
             f"{', '.join(source['wrapper_entries_ignored']) or 'none'})"
             if source['wrapper'] else 'no wrapper')
  prefix = f"'{source['prefix_stripped']}' prefix stripped" if source['prefix_stripped'] else (
      'no prefix')
  what = 'every variable' if report['output']['complete'] else 'backbone only'
  lines = [
      f"{source['path']} -> {report['output']['directory']} ({what})",
      f"input: {source['container']} file, {wrapper}, {prefix}, sha256 {source['sha256']}",
      f"source: {report['source']['description']}",
      'model: ' + ', '.join(f'{k}={v}' for k, v in config.items()),
      f"source tensors {counts['source_tensors']}: used {counts['used']}, ignored "
      f"{counts['ignored']}",
      f"flax leaves {counts['flax_leaves']}: filled {counts['filled']}, fresh {counts['fresh']}",
  ]
  lines += [f'note: {note}' for note in report['notes']]
  lines.append(f"ignored source tensors ({counts['ignored']}):")
  lines += [f"  {e['key']} {_shape_text(e['shape'])}: {e['reason']}" for e in report['ignored']]
  lines.append(f"fresh flax leaves ({counts['fresh']}):")
  lines += [f"  {e['leaf']} {_shape_text(e['shape'])}: {e['reason']}" for e in report['fresh']]
  lines.append(f"used source tensors ({counts['used']}):")
  lines += [f"  {e['key']} {_shape_text(e['shape'])} -> {e['leaf']} "
            f"{_shape_text(e['leaf_shape'])} [{e['transform']}]" for e in report['used']]
  return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- output directory


def _write_directory(directory: str, conversion: Conversion, report: Mapping[str, Any]) -> None:
  flat = {_join(path): value for path, value in _flat_variables(conversion.variables).items()}
  with open(os.path.join(directory, VARIABLES_FILE), 'wb') as f:
    f.write(safetensors.numpy.save(
        flat, metadata={'format': FORMAT_NAME, 'version': str(FORMAT_VERSION)}))
  manifest = {
      'format': FORMAT_NAME, 'version': FORMAT_VERSION,
      'model_config': report['model_config'],
      'complete': conversion.complete,
      'source': {'path': report['input']['path'], 'sha256': report['input']['sha256'],
                 **report['source']},
      'filled': sorted(flat),
      'fresh': {_join(path): reason for path, reason in conversion.plan.fresh.items()},
  }
  for name, text in ((MANIFEST_FILE, json.dumps(manifest, indent=1)),
                     (REPORT_JSON_FILE, json.dumps(report, indent=1)),
                     (REPORT_TEXT_FILE, format_report(report))):
    with open(os.path.join(directory, name), 'w') as f:
      f.write(text)


def _prepare_output(output_dir: str, overwrite: bool) -> None:
  """Raises if ``output_dir`` may not be (re)placed."""
  if not os.path.exists(output_dir):
    return
  if not os.path.isdir(output_dir):
    raise FileExistsError(f'output directory {output_dir}: exists and is not a directory')
  if not os.listdir(output_dir):
    return
  if not overwrite:
    raise FileExistsError(f'output directory {output_dir}: exists and is not empty (overwrite '
                          'replaces an earlier conversion)')
  if not os.path.isfile(os.path.join(output_dir, MANIFEST_FILE)):
    raise FileExistsError(f'output directory {output_dir}: not an earlier conversion (no '
                          f'{MANIFEST_FILE}); refusing to replace it')


def convert_file(input_path: str, output_dir: str, model_config: Mapping[str, Any],
                 overwrite: bool = False) -> dict[str, Any]:
  """Converts a PyTorch / safetensors checkpoint into ``output_dir`` for ``load_variables``.

  Everything is checked before anything is written; the directory is written under a temporary
  name beside ``output_dir`` and renamed, so an error leaves no output.

  Args:
    input_path: .pth / .pt / .pth.tar / .safetensors file (module doc: accepted layouts).
    output_dir: the directory to create (may exist empty; with ``overwrite``, may hold an earlier
      conversion, which is replaced).
    model_config: ``config.model`` of the model the weights are for.
    overwrite: replace an earlier conversion in ``output_dir``.
  Returns:
    The report (``build_report``), also saved as report.json / report.txt in ``output_dir``.
  Raises:
    FileNotFoundError: no input file. FileExistsError: ``output_dir`` not replaceable.
    ValueError naming the file or config field for everything else (module doc).
  """
  _prepare_output(output_dir, overwrite)
  source = read_checkpoint(input_path)
  conversion = convert_state_dict(source.tensors, model_config, name=input_path)
  report = build_report(source, conversion, model_config, output_dir)
  parent = os.path.dirname(os.path.abspath(output_dir))
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f'.{os.path.basename(os.path.abspath(output_dir))}.tmp-'
                         f'{os.getpid()}-{secrets.token_hex(4)}')
  os.mkdir(staging)
  try:
    _write_directory(staging, conversion, report)
    if os.path.exists(output_dir):
      retired = staging + '-old'
      os.rename(output_dir, retired)
      os.rename(staging, output_dir)
      shutil.rmtree(retired)
    else:
      os.rename(staging, output_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return report


# ----------------------------------------------------------------------------- loading


def read_manifest(directory: str) -> dict[str, Any]:
  """The manifest.json of a converted directory (model_config, complete, source, filled, fresh).

  Raises:
    FileNotFoundError naming ``directory`` when it or its manifest is missing.
    ValueError naming the manifest when it is not one this version writes.
  """
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'{directory}: no such converted-weights directory')
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory}: no {MANIFEST_FILE}: not a directory written by '
                            'scripts/convert_torch_weights.py')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: unreadable manifest: {e}') from e
  if (not isinstance(manifest, dict) or manifest.get('format') != FORMAT_NAME
      or manifest.get('version') != FORMAT_VERSION):
    raise ValueError(f'{path}: not a {FORMAT_NAME} manifest of version {FORMAT_VERSION}')
  return manifest


def check_model_config(manifest: Mapping[str, Any], model_config: Mapping[str, Any],
                       directory: str) -> None:
  """Raises ValueError naming each config.model field that differs from the converted one.

  Compared: arch, ibn_mode, in_channels, width; for a complete conversion also num_classes,
  num_low_level_features, aspp_channels, decoder_channels, low_level_channels.
  """
  converted = manifest['model_config']
  config = model_config_dict(model_config)
  fields = BACKBONE_FIELDS + (HEAD_FIELDS if manifest['complete'] else ())
  differ = [f'config.model.{field}={config.get(field)!r} (converted for '
            f'{converted.get(field)!r})' for field in fields
            if config.get(field) != converted.get(field)]
  if differ:
    raise ValueError(f'{directory}: converted for another model: ' + '; '.join(differ))


def load_variables(directory: str,
                   model_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Reads a directory written by ``convert_file`` / scripts/convert_torch_weights.py.

  Args:
    directory: the converted-weights directory.
    model_config: when given, ``check_model_config`` verifies the directory was converted for it.
  Returns:
    {'params': ..., 'batch_stats': ...} nested dicts of float32 numpy arrays: every variable of
    a full DeepLabV3+ checkpoint, or only the backbone's (fresh leaves are absent) for an
    ImageNet file; ``read_manifest(directory)['complete']`` tells which.
  Raises:
    FileNotFoundError naming the directory or file that is missing; ValueError for a corrupt
    directory or a config mismatch.
  """
  manifest = read_manifest(directory)
  if model_config is not None:
    check_model_config(manifest, model_config, directory)
  path = os.path.join(directory, VARIABLES_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{directory}: no {VARIABLES_FILE}')
  flat = _read_safetensors(path)
  if set(flat) != set(manifest['filled']):
    extra = sorted(set(flat) - set(manifest['filled']))
    absent = sorted(set(manifest['filled']) - set(flat))
    raise ValueError(f'{path}: does not match {MANIFEST_FILE}: unlisted {extra}, absent {absent}')
  variables = {'params': {}, 'batch_stats': {}}
  variables.update(_unflatten({tuple(key.split('/')): value for key, value in flat.items()}))
  return variables


__all__ = [
    'ACCEPTED_BACKBONE_VARIANTS', 'Conversion', 'Plan', 'SourceFile', 'SourceLayout',
    'build_report', 'check_model_config', 'convert_file', 'convert_state_dict', 'describe_source',
    'flax_path_to_torch_key', 'format_report', 'load_variables', 'model_config_dict',
    'plan_conversion', 'read_checkpoint', 'read_manifest', 'state_dict_to_variables',
    'torch_key_to_module_path', 'variable_shapes',
]
