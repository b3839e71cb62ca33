"""PyTorch state_dict -> Flax variables for the DeepLabV3+ / IBN-ResNet models.

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

These are the authors' DeepLab keys (``backbone.*`` with torchvision / IBN-Net ResNet names,
``aspp.*``, ``decoder.*``). The conversion is strict: every key must land on a template leaf with
the template's shape and every template leaf must be filled, else one ValueError lists all
problems.
"""
from typing import Any, Mapping

import numpy as np

_DROPPED_LEAVES = ('num_batches_tracked',)
# torch leaf -> (collection, flax leaf); 'weight' is resolved against the template.
_LEAF_MAP = {
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
    'mean_weight': ('params', 'mean_weight'),
    'var_weight': ('params', 'var_weight'),
}


def torch_key_to_module_path(key: str) -> tuple[tuple[str, ...], str]:
  """'backbone.layer1.0.bn1.IN.weight' -> (('backbone', 'layer1_0', 'bn1', 'IN'), 'weight')."""
  parts: list[str] = []
  for part in key.split('.'):
    if part.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{part}'
    else:
      parts.append(part)
  return tuple(parts[:-1]), parts[-1]


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


def _to_flax_layout(value: np.ndarray, flax_leaf: str, shape: tuple[int, ...]) -> np.ndarray:
  if flax_leaf == 'kernel' and value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if len(shape) == 1 and value.size == max(value.shape, default=1):
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
  flat_template = {(collection,) + path: leaf
                   for collection, tree in template.items()
                   for path, leaf in _flatten(tree).items()}
  filled: dict[tuple[str, ...], np.ndarray] = {}
  unmatched, mismatched = [], []
  for key, value in state_dict.items():
    module_path, leaf = torch_key_to_module_path(key)
    if leaf in _DROPPED_LEAVES:
      continue
    if leaf == 'weight':
      kind = 'kernel' if ('params',) + module_path + ('kernel',) in flat_template else 'scale'
      collection, flax_leaf = 'params', kind
    elif leaf in _LEAF_MAP:
      collection, flax_leaf = _LEAF_MAP[leaf]
    else:
      unmatched.append(key)
      continue
    path = (collection,) + module_path + (flax_leaf,)
    if path not in flat_template:
      unmatched.append(key)
      continue
    target = flat_template[path]
    array = _to_flax_layout(np.asarray(value), flax_leaf, tuple(target.shape))
    if array.shape != tuple(target.shape):
      mismatched.append(f'{key} {tuple(np.shape(value))} -> {"/".join(path)} '
                        f'expects {tuple(target.shape)}')
      continue
    filled[path] = array.astype(target.dtype)
  unfilled = sorted('/'.join(path) for path in flat_template if path not in filled)
  if unmatched or mismatched or unfilled:
    lines = ([f'unmatched torch key: {key}' for key in unmatched]
             + [f'shape mismatch: {entry}' for entry in mismatched]
             + [f'unfilled flax leaf: {path}' for path in unfilled])
    raise ValueError('state_dict does not match the model:\n  ' + '\n  '.join(lines))
  return _unflatten(filled)


__all__ = ['state_dict_to_variables', 'torch_key_to_module_path']
