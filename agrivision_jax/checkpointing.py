"""Orbax checkpoints of the train state together with the grain data-iterator state.

Layout: ``workdir/checkpoints/<step>/{state, data_iterator}`` (the rolling checkpoints) and
``workdir/best/<step>/state`` (the best validation mIoU so far, kept apart from the rolling
ones). ``state`` holds params, batch_stats, opt_state and step (replicated: process 0 writes one
copy; restored onto the shardings asked for); ``data_iterator`` holds one JSON file per process
(grain's checkpoint handler), so a resumed run reads exactly the batches the uninterrupted run
would have read. Workdirs are local paths or URLs such as ``gs://bucket/run`` (``etils.epath``).

A save blocks until the files are written, so a failure (full disk, no permission) raises
``CheckpointSaveError`` from the ``save`` call that caused it. A checkpoint that does not restore
(truncated array file, missing ``_METADATA``, garbage iterator JSON) is renamed
``<step>.corrupt`` once an older one restores, and the older one is used.

Also: placing host variables on a mesh, and merging converted weights (``config.init_from``) into
fresh ones.
"""

import asyncio
import contextlib
import errno as errno_lib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from agrivision_jax import workdir as workdir_lib

STATE = 'state'
DATA_ITERATOR = 'data_iterator'
CORRUPT_SUFFIX = '.corrupt'


class CheckpointSaveError(OSError):
  """A checkpoint could not be written; ``errno`` and ``filename`` are set where known."""

  def __str__(self) -> str:
    return self.args[0]


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a directory restores (e.g. a config that does not match them)."""


def checkpoint_dir(workdir: str | epath.PathLike) -> epath.Path:
  """Returns ``workdir/checkpoints`` (``str()`` of it is 'gs://bucket/run/checkpoints' for a URL)."""
  return workdir_lib.path(workdir) / 'checkpoints'


def best_dir(workdir: str | epath.PathLike) -> epath.Path:
  """Returns ``workdir/best``, where ``BestCheckpoint`` keeps the best-mIoU checkpoint."""
  return workdir_lib.path(workdir) / 'best'


def create_manager(workdir: str, max_to_keep: int | None = None,
                   read_only: bool = False) -> ocp.CheckpointManager:
  """Opens the CheckpointManager of ``workdir/checkpoints`` (created unless ``read_only``).

  Args:
    workdir: the run's directory (local path or gs:// URL).
    max_to_keep: newest checkpoints kept; None keeps all.
    read_only: open an existing directory for restoring only.

  Returns:
    An ``ocp.CheckpointManager`` over the items 'state' and 'data_iterator'. Unfinished saves
    (``<step>.orbax-checkpoint-tmp``) of an earlier, interrupted run are removed on opening.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE, DATA_ITERATOR))


def _errno_of(error: BaseException) -> int | None:
  """The OS error number of ``error`` or its causes (tensorstore writes ``os_error_code='28'``)."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return seen.errno
    found = re.search(r"os_error_code='?(\d+)", str(seen)) or re.search(r'\[Errno (\d+)\]',
                                                                       str(seen))
    if found:
      return int(found.group(1))
    seen = seen.__cause__ or seen.__context__
  return None


def _file_in(error: BaseException, directory: epath.Path) -> str | None:
  """The most specific quoted or OSError path under ``directory`` that ``error`` mentions."""
  root = str(directory)
  candidates = [getattr(error, 'filename', None)] + re.findall(r'"([^"]+)"', str(error))
  candidates = [str(c).rstrip('/') for c in candidates if c and str(c).startswith(root)]
  return max(candidates, key=len) if candidates else None


def _reason(error: BaseException, where: str | None = None) -> str:
  """The first line of ``error``'s text without tensorstore's spec dump, at most 300 characters.

  When the text names ``where`` ('... "<where>": why'), only the part after it is kept.
  """
  if isinstance(error, OSError) and error.strerror and where and error.filename == where:
    return f'{type(error).__name__}: {error.strerror}'
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text.split(' [tensorstore_spec')[0].split(' [source locations')[0]
  if where and f'"{where}": ' in text:
    text = text.rsplit(f'"{where}": ', 1)[1]
  return f'{type(error).__name__}: {text[:300]}'


def _save_error(step: int, directory: epath.Path, error: BaseException) -> CheckpointSaveError:
  code = _errno_of(error)
  name = f' {errno_lib.errorcode.get(code, "")}'.rstrip() if code else ''
  where = _file_in(error, directory) or str(directory / str(step))
  detail = f'[Errno {code}{name}] ' if code else ''
  result = CheckpointSaveError(
      f'saving checkpoint step {step} failed: {where}: {detail}{_reason(error, where)}')
  result.errno, result.filename = code, where
  return result


def wait_until_finished(manager: ocp.CheckpointManager) -> None:
  """Blocks until pending saves are written; raises ``CheckpointSaveError`` if one failed."""
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as error:  # pylint: disable=broad-except  (orbax re-raises any writer error)
    raise _save_error(manager.latest_step() or -1, epath.Path(manager.directory), error) from error


def _save(manager: ocp.CheckpointManager, step: int, items: dict, **kwargs) -> None:
  wait_until_finished(manager)   # an earlier failure is not hidden behind this save
  directory = epath.Path(manager.directory)
  try:
    manager.save(step, args=ocp.args.Composite(**items), **kwargs)
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as error:  # pylint: disable=broad-except
    raise _save_error(step, directory, error) from error


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any) -> None:
  """Saves ``state`` (a pytree of replicated arrays) and the iterator's position as ``step``.

  Every process calls it (process 0 writes the replicated state, each process its iterator
  file). It returns once the files are written (the cost is the write time of one checkpoint).
  A step that is already saved (e.g. the last step, saved again on a stop request) is kept as it
  is.

  Raises:
    CheckpointSaveError: one line naming the file (or step directory), the errno and reason;
      the training loop must stop (it is an ``OSError``).
  """
  if step in manager.all_steps():
    return
  _save(manager, step, {STATE: ocp.args.StandardSave(jax.device_get(state)),
                        DATA_ITERATOR: grain.checkpoint.CheckpointSave(data_iterator)})


def _iterator_file(step_dir: epath.Path) -> epath.Path:
  """This process's iterator file (grain's checkpoint handler names it so)."""
  return step_dir / DATA_ITERATOR / f'process_{jax.process_index()}-of-{jax.process_count()}.json'


def _restore_error(step: int, step_dir: epath.Path, error: BaseException) -> CheckpointRestoreError:
  where = _file_in(error, step_dir)
  if where is None and isinstance(error, json.JSONDecodeError):
    where = str(_iterator_file(step_dir))
  return CheckpointRestoreError(
      f'checkpoint step {step} does not restore: {where or step_dir}: {_reason(error, where)}')


def _read_local(step_dir: epath.Path, data_iterator: Any | None) -> Any:
  """Checks the files orbax and grain always write; returns the parsed iterator state (or None).

  Reads only this process's files and runs no collective, so the processes can agree on the
  result before the collective restore of the arrays.
  """
  required = [step_dir / STATE / '_METADATA']
  if data_iterator is not None:
    required.append(_iterator_file(step_dir))
  for path in required:
    if not path.exists():
      raise FileNotFoundError(errno_lib.ENOENT, 'missing (orbax and grain always write it)',
                              str(path))
  if data_iterator is None:
    return None
  text = _iterator_file(step_dir).read_text()
  return json.loads(text) if isinstance(data_iterator, grain.DatasetIterator) else text.encode()


def _set_iterator(data_iterator: Any, iterator_state: Any) -> None:
  """What grain's checkpoint handler does after reading the file."""
  data_iterator.set_state(iterator_state)
  data_iterator.start_prefetch()


class _FinishingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its unfinished tasks end before it closes.

  orbax reads a checkpoint's arrays concurrently in a loop of its own and closes that loop as
  soon as one read fails (a damaged file). The other reads would outlive it: their TensorStore
  callbacks then fail on the closed loop (a traceback each on stderr, thousands for a real
  model), and their orphaned coroutines raise when garbage-collected later, at a random point
  of the run (inside an import, that breaks the import). Here they end first, their errors
  collected with the failed restore's.
  """

  def close(self) -> None:
    pending = [task for task in asyncio.all_tasks(self) if not task.done()]
    if pending and not self.is_running() and not self.is_closed():
      self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _FinishingEventLoopPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _FinishingEventLoop()


@contextlib.contextmanager
def _event_loops_finish_their_tasks():
  """Event loops created inside (orbax's) are ``_FinishingEventLoop``s."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_FinishingEventLoopPolicy())
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def _restore_arrays(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  with _event_loops_finish_their_tasks():
    return manager.restore(step, args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state)}))[STATE]


def _restore_phases(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                    data_iterator: Any | None, agree: Callable[[bool], bool] | None) -> Any:
  """Restores ``step`` in phases, calling ``agree(ok)`` after each when it is given.

  1. this process's files (no collective); 2. the arrays (orbax; collective on several
  processes, so it only starts once every process passed 1); 3. the iterator position (local).

  Raises:
    CheckpointRestoreError: a phase failed here (or, through ``agree``, on another process).
  """
  step_dir = epath.Path(manager.directory) / str(step)

  def run(phase, *args):
    result, error = None, None
    try:
      result = phase(*args)
    except Exception as e:  # pylint: disable=broad-except  (tensorstore, json, orbax, OS)
      error = _restore_error(step, step_dir, e)
      error.__cause__ = e
    if agree is not None and not agree(error is None) and error is None:
      error = CheckpointRestoreError(
          f'checkpoint step {step} does not restore: {step_dir}: failed on another process')
    if error is not None:
      raise error
    return result

  iterator_state = run(_read_local, step_dir, data_iterator)
  state = run(_restore_arrays, manager, step, abstract_state)
  if data_iterator is not None:
    run(_set_iterator, data_iterator, iterator_state)
  return state


def restore_step(manager: ocp.CheckpointManager, step: int, abstract_state: Any,
                 data_iterator: Any | None = None) -> Any:
  """Restores checkpoint ``step``.

  Args:
    manager: from ``create_manager`` (or ``resolve_restore``).
    step: an existing step (``manager.all_steps()``).
    abstract_state: pytree of ``jax.ShapeDtypeStruct`` with shardings, the structure of the state.
    data_iterator: if given, its state is set to the saved position (in place).

  Returns:
    The restored state, each array on the sharding of its ``abstract_state`` leaf.

  Raises:
    CheckpointRestoreError: one line naming the step directory, the file where known, and why.
  """
  return _restore_phases(manager, step, abstract_state, data_iterator, agree=None)


def _agree(ok: bool) -> bool:
  """True when ``ok`` holds on every process (one small all-gather when there are several)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _mark_corrupt(manager: ocp.CheckpointManager, steps: list[int]) -> None:
  """Renames each step directory to ``<step>.corrupt`` (process 0) and re-reads the step list."""
  directory = epath.Path(manager.directory)
  if jax.process_index() == 0:
    for step in steps:
      target = directory / f'{step}{CORRUPT_SUFFIX}'
      suffix = 1
      while target.exists():
        target, suffix = directory / f'{step}{CORRUPT_SUFFIX}{suffix}', suffix + 1
      (directory / str(step)).rename(target)
      logging.warning('checkpoint step %d renamed to %s', step, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('agrivision_jax.checkpointing.mark_corrupt')
  manager.reload()


def restore_newest(manager: ocp.CheckpointManager, abstract_state: Any,
                   data_iterator: Any | None = None) -> tuple[int, Any] | None:
  """Restores the newest step that restores, newest first.

  A step that fails is logged (one line naming the file) and the next older one is tried. Once an
  older step restores, the newer failed ones are renamed ``<step>.corrupt`` (process 0), so a
  later save does not collide with them. On several processes every process takes part, and
  they agree after each phase (one all-gather each): each process first checks and parses its
  own files, the collective restore of the arrays starts only when all of them passed, so a
  damaged file of one process (its iterator JSON) sends every process to the older step.

  Args:
    manager: from ``create_manager`` (not read-only when a step may have to be renamed).
    abstract_state: as for ``restore_step``.
    data_iterator: as for ``restore_step``.

  Returns:
    (step, state), or None when the directory holds no checkpoint.

  Raises:
    CheckpointRestoreError: checkpoints exist but none restores (nothing is renamed then: a
      config that does not match the checkpoints must not condemn them); the newest error.
  """
  failed: list[int] = []
  first_error: CheckpointRestoreError | None = None
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = _restore_phases(manager, step, abstract_state, data_iterator, agree=_agree)
    except CheckpointRestoreError as error:
      logging.error('%s; trying the previous checkpoint', error)
      failed.append(step)
      first_error = first_error or error
      continue
    if failed:
      _mark_corrupt(manager, failed)
    return step, state
  if first_error is not None:
    raise CheckpointRestoreError(
        f'no checkpoint in {manager.directory} restores (steps {failed}; a config that does not '
        f'match them, or move them away to start over); newest: {first_error}'
    ) from first_error
  return None


class BestCheckpoint:
  """The checkpoint of the best validation mIoU so far, in ``workdir/best/<step>/state``.

  Kept apart from the rolling ``checkpoints/`` so ``max_to_keep`` never deletes it. Only the
  state is saved (no data iterator): it is for evaluation and prediction, not for resuming.
  Every process constructs it and calls ``update`` with the same values.
  """

  def __init__(self, workdir: str):
    """Opens (creating) ``workdir/best``."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda m: m['miou'], best_mode='max',
        keep_checkpoints_without_metrics=False, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(best_dir(workdir), options=options, item_names=(STATE,))

  def best(self) -> tuple[int, float] | None:
    """(best_step, best_miou), or None before the first ``update`` that saved."""
    step = self.manager.best_step()
    if step is None:
      return None
    return step, float(self.manager.metrics(step)['miou'])

  def update(self, step: int, miou: float, state: Any) -> bool:
    """Saves ``state`` as ``step`` when ``miou`` beats the best so far (a NaN never does).

    Returns:
      True when it saved.

    Raises:
      CheckpointSaveError: as ``save``.
    """
    miou = float(miou)
    current = self.best()
    if not np.isfinite(miou) or (current is not None and miou <= current[1]):
      return False
    if step in self.manager.all_steps():   # the same step again, after resuming from before it
      self.manager.delete(step)
    _save(self.manager, step, {STATE: ocp.args.StandardSave(jax.device_get(state))},
          metrics={'miou': miou}, force=True)
    return True

  def close(self) -> None:
    """Closes the manager."""
    self.manager.close()


def resolve_restore(workdir: str, restore: str | int) -> tuple[ocp.CheckpointManager, int]:
  """Finds the checkpoint ``config.restore`` names.

  Args:
    workdir: a training run's directory.
    restore: 'latest' (newest rolling checkpoint), 'best' (``BestCheckpoint``), or a step (int
      or a string of digits) among the rolling checkpoints.

  Returns:
    (read-only manager of the directory holding it, step): pass both to ``restore_step``.

  Raises:
    FileNotFoundError: one line naming the directory (and the steps it has) when absent.
    ValueError: ``restore`` is none of these.
  """
  if isinstance(restore, str) and restore.isdigit():
    restore = int(restore)
  if restore == 'best':
    directory, items = best_dir(workdir), (STATE,)
  elif restore == 'latest' or (isinstance(restore, int) and not isinstance(restore, bool)):
    directory, items = checkpoint_dir(workdir), (STATE, DATA_ITERATOR)
  else:
    raise ValueError(f"config.restore: {restore!r} is neither 'latest', 'best' nor a step")
  if not directory.exists():
    raise FileNotFoundError(f'no checkpoint directory {directory}')
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
      item_names=items)
  steps = manager.all_steps()
  step = manager.latest_step() if restore in ('latest', 'best') else restore
  if step is None or step not in steps:
    manager.close()
    wanted = 'a checkpoint' if step is None else f'checkpoint step {step}'
    raise FileNotFoundError(f'no {wanted} in {directory} (steps there: {sorted(steps)})')
  return manager, step


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
