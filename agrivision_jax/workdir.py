"""Workdir paths (local or gs:// URLs) and one writer per workdir (an exclusive lock).

Local workdirs: ``fcntl.flock`` on ``<workdir>/.lock``, which holds "pid host" of the holder.
The kernel releases the lock when the holder exits, however it exits (SIGKILL included), so a
dead holder's lock is simply taken over. URL workdirs (gs://...) have no lock primitive: the
holder's "pid host" is written to ``.lock`` and a previous holder is only logged (best effort:
two live runs on one bucket path are not prevented). Only process 0 locks; the other processes
of a multi-host run get a context that does nothing.
"""

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

import jax
from absl import logging
from etils import epath

LOCK_FILE = '.lock'


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


def path(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an ``epath.Path``: URLs (gs://...) kept as they are, local paths absolute."""
  result = epath.Path(workdir)
  return result if '://' in str(workdir) else result.absolute()


def _holder_line() -> str:
  return f'{os.getpid()} {socket.gethostname()}'


def _busy(workdir: str, text: str) -> WorkdirBusyError:
  pid, _, host = text.strip().partition(' ')
  return WorkdirBusyError(f'workdir {workdir} is in use by pid {pid or "?"} on host '
                          f'{host or "?"} (lock file {os.path.join(workdir, LOCK_FILE)}); '
                          'stop that run or use another --workdir')


@contextlib.contextmanager
def _lock_local(workdir: str) -> Iterator[None]:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise _busy(workdir, os.pread(fd, 4096, 0).decode(errors='replace')) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_holder_line() + '\n').encode(), 0)
    yield
  finally:
    os.close(fd)   # releases the flock; the file stays (removing it would race a new holder)


@contextlib.contextmanager
def _lock_url(workdir: str) -> Iterator[None]:
  path = epath.Path(workdir) / LOCK_FILE
  if path.exists():
    logging.warning('%s names an earlier holder (%s); taking the workdir over (URL workdirs '
                    'have no lock: make sure that run is gone)', path, path.read_text().strip())
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(_holder_line() + '\n')
  try:
    yield
  finally:
    path.unlink(missing_ok=True)


def lock(workdir: str | os.PathLike) -> contextlib.AbstractContextManager:
  """Holds ``workdir`` exclusively for the ``with`` block (creating the directory).

  Args:
    workdir: a local path or a URL such as gs://bucket/run.

  Returns:
    A context manager; entering it raises ``WorkdirBusyError`` ("workdir W is in use by pid P on
    host H ...") when another live process holds a local workdir.
  """
  if jax.process_index() != 0:
    return contextlib.nullcontext()
  if '://' in str(workdir):
    return _lock_url(str(workdir))
  return _lock_local(os.fspath(workdir))
