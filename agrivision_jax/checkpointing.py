"""Orbax checkpoints of the train state together with the grain data-iterator state.

Layout: ``workdir/checkpoints/<step>/{state, data_iterator}``; ``state`` holds params,
batch_stats, opt_state and step (replicated: process 0 writes one copy; restored onto the
shardings asked for);
``data_iterator`` holds one JSON file per process (grain's checkpoint handler), so a resumed run
reads exactly the batches the uninterrupted run would have read. Also: placing host variables
on a mesh, and merging converted weights (``config.init_from``) into fresh ones.
"""

import os
from collections.abc import Mapping
from typing import Any

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

STATE = 'state'
DATA_ITERATOR = 'data_iterator'


def checkpoint_dir(workdir: str) -> str:
  """Returns ``workdir/checkpoints`` as an absolute path."""
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, max_to_keep: int | None = None,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """Opens the CheckpointManager of ``workdir`` (creating ``checkpoints/`` unless ``read_only``).

  Args:
    workdir: the run's directory.
    max_to_keep: newest checkpoints kept; None keeps all.
    read_only: open an existing directory for restoring only.

  Returns:
    An ``ocp.CheckpointManager`` over the items 'state' and 'data_iterator'.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE, DATA_ITERATOR))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any) -> None:
  """Saves ``state`` (a pytree of replicated arrays) and the iterator's position as ``step``.

  The state is copied to host memory before this returns (one copy of each replicated array;
  process 0 writes it), so ``state`` may be donated afterwards; the files are written in the
  background (``manager.wait_until_finished()`` to block).
  """
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(jax.device_get(state)),
      DATA_ITERATOR: grain.checkpoint.CheckpointSave(data_iterator),
  }))


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
            data_iterator: Any | None = None) -> Any:
  """Restores checkpoint ``step``.

  Args:
    manager: from ``create_manager``.
    step: an existing step (``manager.latest_step()``).
    abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings, the structure of the state.
    data_iterator: if given, its state is set to the saved position (in place).

  Returns:
    The restored state, each array on the sharding of its ``abstract_state`` leaf.
  """
  items = {STATE: ocp.args.StandardRestore(abstract_state)}
  if data_iterator is not None:
    items[DATA_ITERATOR] = grain.checkpoint.CheckpointRestore(data_iterator)
  return manager.restore(step, args=ocp.args.Composite(**items))[STATE]


def place_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Puts a host pytree (the same values on every process) on every device of ``mesh``."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree)


def merge_variables(fresh: Mapping[str, Any], loaded: Mapping[str, Any], source: str) -> dict:
  """Overwrites the leaves of ``fresh`` that ``loaded`` has (e.g. converted ImageNet backbones).

  Args:
    fresh: {'params', 'batch_stats'} of the freshly initialised model.
    loaded: a subset of the same trees (``agrivision_jax.convert.load_variables``).
    source: where ``loaded`` came from, for error messages.

  Returns:
    ``fresh`` with every leaf of ``loaded`` copied in.

  Raises:
    ValueError: a loaded leaf the model does not have, or one of a different shape.
  """
  fresh_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(fresh)), sep='/')
  loaded_flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(loaded)), sep='/')
  unknown = sorted(set(loaded_flat) - set(fresh_flat))
  if unknown:
    raise ValueError(f'{source}: variables the model does not have: {unknown[:10]}'
                     f'{" ..." if len(unknown) > 10 else ""}')
  mismatched = [f'{k}: {np.shape(v)} vs model {np.shape(fresh_flat[k])}'
                for k, v in loaded_flat.items() if np.shape(v) != np.shape(fresh_flat[k])]
  if mismatched:
    raise ValueError(f'{source}: shape mismatch: {mismatched[:10]}')
  fresh_flat.update({k: np.asarray(v, np.asarray(fresh_flat[k]).dtype)
                     for k, v in loaded_flat.items()})
  return flax.traverse_util.unflatten_dict(fresh_flat, sep='/')
