"""Stopping on SIGTERM / SIGINT (preemption, Ctrl-C) at a step boundary, after a checkpoint.

The first SIGTERM or SIGINT only sets a flag: the training loop sees ``requested()`` at its next
step, saves a checkpoint and raises ``Preempted``. Python's own SIGINT handling
(KeyboardInterrupt, which JAX can swallow inside a garbage-collection callback) is replaced for
the duration of ``StopSignals``. After the first signal both signals get their default action
back, so a second one ends the process at once, even inside a long XLA call, with no cleanup:
the process dies of that signal and the shell reports the exit status 128+signum.

Several processes (multi-host): a scheduler may signal only some of them, so ``requested()``
agrees across processes: every ``sync_every_steps``-th call all-gathers the processes' flags
(one tiny collective, which also waits for the step already dispatched, so it is not done every
step) and returns True on every process once any of them was signalled. Every process must call
it once per step. With one process it reads the local flag and runs no collective.

grain worker processes are in the terminal's process group and receive its Ctrl-C too; pass
``worker_init`` as ``worker_init_fn`` of ``mp_prefetch`` so they ignore SIGINT and keep feeding
the main process until it has saved (they end when the main process stops them).
"""

import os
import signal
import threading
from types import FrameType

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint; rerunning the command resumes.

  ``exit_status`` (128 + signum, e.g. 143 for SIGTERM) is what main should exit with, the status
  a shell reports for a process ended by that signal.
  """

  def __init__(self, message: str, signum: int | None = None):
    """Args: message: one line (the step saved, the workdir); signum: the signal received
    (None on a process that was not signalled itself: SIGTERM is assumed)."""
    super().__init__(message)
    self.signum = signal.SIGTERM if signum is None else signum
    self.exit_status = 128 + int(self.signum)


def worker_init(worker_index: int, worker_count: int) -> None:
  """grain ``worker_init_fn``: the worker ignores SIGINT (the main process decides when to stop).

  No parent-death signal is set: Linux sends it when the THREAD that started the worker exits,
  and grain starts workers from threads that end, which would kill live workers.

  Args:
    worker_index: index of this worker (unused).
    worker_count: number of workers (unused).
  """
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopSignals:
  """Context manager catching SIGTERM and SIGINT in the main thread; see the module docstring.

  Usage::

    with preemption.StopSignals() as stop:
      for step in ...:
        ...
        if stop.requested():
          save(...); raise preemption.Preempted(...)
  """

  def __init__(self, sync_every_steps: int = 10):
    """Args: sync_every_steps: calls of ``requested()`` between two cross-process agreements
    (the delay before a multi-process run stops); ignored with one process."""
    if sync_every_steps < 1:
      raise ValueError(f'sync_every_steps must be >= 1, got {sync_every_steps}')
    self._sync_every = sync_every_steps
    self._calls = 0
    self._agreed = False
    self.signum: int | None = None   # the first signal received by this process
    self._previous: dict[int, object] = {}

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    self.signum = signum
    for s in SIGNALS:   # a second signal now ends the process (default action), at once
      signal.signal(s, signal.SIG_DFL)
    os.write(2, (f'\nreceived {signal.Signals(signum).name}: stopping after the current step '
                 'and a checkpoint; send it again to exit at once without saving\n').encode())

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError('StopSignals must be entered in the main thread (signal handlers)')
    for s in SIGNALS:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()

  def requested(self) -> bool:
    """True once a stop was requested (by a signal to this or, agreed, to any process)."""
    if jax.process_count() == 1:
      return self.signum is not None
    if not self._agreed:
      self._calls += 1
      if self._calls % self._sync_every == 0:
        flags = multihost_utils.process_allgather(np.asarray(self.signum is not None, np.int32))
        self._agreed = bool(np.any(flags))
    return self._agreed
