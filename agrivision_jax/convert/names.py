"""Torch state_dict key <-> flax variable path, layout transposes, strict copy onto a template."""
import re
from typing import Any, Mapping

import numpy as np



DROPPED_LEAVES = ('num_batches_tracked',)
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


Path = tuple[str, ...]
FIRST_CONV = ('params', 'backbone', 'conv1', 'kernel')


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


def unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict[str, Any]:
  """{('params', 'backbone', 'conv1', 'kernel'): x, ...} -> the nested dict {'params': {...}}."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return tree


def flat_variables(template: Mapping[str, Any]) -> dict[Path, Any]:
  """{'params': {...}, 'batch_stats': {...}} -> {(collection, module, ..., leaf): leaf value}."""
  return {(collection,) + path: leaf
          for collection, tree in template.items()
          for path, leaf in _flatten(tree).items()}


def join_path(path: Path) -> str:
  """('params', 'backbone', 'conv1', 'kernel') -> 'params/backbone/conv1/kernel'."""
  return '/'.join(path)


def match_key(key: str, flat_template: Mapping[Path, Any]) -> Path | None:
  """The path of ``flat_template`` (from ``flat_variables``) that torch ``key`` names by the
  name rule of ``agrivision_jax.convert``, or None when it names no leaf there."""
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


def layout_transform(path: Path, shape: tuple[int, ...], target: tuple[int, ...],
                     nir_from_r: bool) -> tuple[str, tuple[int, ...]]:
  """(transform name, converted shape) of a torch tensor of ``shape`` going to ``path``.

  Conv kernels (O, I, kh, kw) -> 'OIHW->HWIO' (kh, kw, I, O); with ``nir_from_r`` a 3-input
  first conv whose ``target`` has 4 inputs gets the NIR filter; a (1, C, 1, 1) norm vector for a
  (C,) ``target`` -> 'flatten'; anything else 'copy'. ``apply_transform`` applies the name.
  """
  if path[-1] == 'kernel' and len(shape) == 4:
    out, cin, kh, kw = shape
    if nir_from_r and path == FIRST_CONV and cin == 3 and target[2:3] == (4,):
      return 'OIHW->HWIO, 4th input filter (NIR) = R filter', (kh, kw, 4, out)
    return 'OIHW->HWIO', (kh, kw, cin, out)
  size = int(np.prod(shape, dtype=np.int64))
  if len(target) == 1 and len(shape) > 1 and size == max(shape):
    return 'flatten', (size,)
  return 'copy', tuple(shape)


def apply_transform(transform: str, value: np.ndarray) -> np.ndarray:
  """Applies a transform named by ``layout_transform`` to a torch-layout array."""
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
  flat_template = flat_variables(template)
  filled: dict[Path, np.ndarray] = {}
  unmatched, mismatched = [], []
  for key, value in state_dict.items():
    if torch_key_to_module_path(key)[1] in DROPPED_LEAVES:
      continue
    path = match_key(key, flat_template)
    if path is None:
      unmatched.append(key)
      continue
    target = flat_template[path]
    value = np.asarray(value)
    transform, shape = layout_transform(path, value.shape, tuple(target.shape), nir_from_r=False)
    if shape != tuple(target.shape):
      mismatched.append(f'{key} {value.shape} -> {join_path(path)} expects {tuple(target.shape)}')
      continue
    filled[path] = apply_transform(transform, value).astype(target.dtype)
  unfilled = sorted(join_path(path) for path in flat_template if path not in filled)
  if unmatched or mismatched or unfilled:
    lines = ([f'unmatched torch key: {key}' for key in unmatched]
             + [f'shape mismatch: {entry}' for entry in mismatched]
             + [f'unfilled flax leaf: {path}' for path in unfilled])
    raise ValueError('state_dict does not match the model:\n  ' + '\n  '.join(lines))
  return unflatten(filled)


# ----------------------------------------------------------------------------- reading files
