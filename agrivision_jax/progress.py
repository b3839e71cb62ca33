"""Progress lines with count, rate and ETA: the one formatter, and a rate-limited logger.

``format_progress`` is used for training steps, prediction and divergence tiles and dataset
building. ``Progress`` measures the rate from the end of the first batch, so the compilation
that the first batch pays for does not drag the rate and the ETA down for the whole run.
"""

import math
import time

from absl import logging


def format_eta(seconds: float) -> str:
  """'H:MM:SS' of ``seconds`` (rounded); '?' when it is not finite or negative."""
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours:d}:{minutes:02d}:{secs:02d}'


def format_progress(what: str, done: int, total: int, rate: float, *, unit: str = 'tiles',
                    extra: str = '') -> str:
  """One progress line, e.g. 'predict val: 120/400 tiles  10.0 tiles/s  ETA 0:00:28'.

  Args:
    what: the prefix ('train', 'predict val', ...).
    done: units done so far.
    total: units expected in all.
    rate: units per second (the ETA is ``(total - done) / rate``; '?' when ``rate`` <= 0).
    unit: 'tiles', 'steps', ...
    extra: appended after two spaces when not empty (e.g. 'loss 0.4312').

  Returns:
    The line, without a newline. Rates under 10 get two decimals, others one.
  """
  eta = format_eta((total - done) / rate) if rate > 0 else '?'
  rate_text = f'{rate:.2f}' if rate < 10 else f'{rate:.1f}'
  line = f'{what}: {done}/{total} {unit}  {rate_text} {unit}/s  ETA {eta}'
  return f'{line}  {extra}' if extra else line


class Progress:
  """Logs ``format_progress`` at most every ``interval_s`` seconds, and once more at the end."""

  def __init__(self, what: str, total: int, interval_s: float = 10.0, unit: str = 'tiles'):
    """Args: what: prefix of the line; total: the number of units expected; interval_s: the
    least time between two lines; unit: what is counted."""
    self._what, self._total, self._interval_s, self._unit = what, total, interval_s, unit
    self._start = self._last = time.perf_counter()
    self._first: tuple[float, int] | None = None   # (time, units done) after the first batch
    self.done = 0

  def rate(self, now: float) -> float:
    """Units per second since the first batch (over the whole run while there is one batch)."""
    if self._first is None or self.done == self._first[1] or now <= self._first[0]:
      return self.done / max(now - self._start, 1e-9)
    return (self.done - self._first[1]) / (now - self._first[0])

  def update(self, count: int) -> None:
    """Records ``count`` more units done; logs a line if ``interval_s`` has passed."""
    self.done += count
    now = time.perf_counter()
    if self._first is None:
      self._first = (now, self.done)
    if now - self._last >= self._interval_s:
      self._last = now
      logging.info(format_progress(self._what, self.done, self._total, self.rate(now),
                                   unit=self._unit))

  def finish(self) -> float:
    """Logs the final line; returns the steady-state units per second (``rate``)."""
    now = time.perf_counter()
    rate = self.rate(now)
    logging.info(format_progress(self._what, self.done, self._total, rate, unit=self._unit,
                                 extra=f'({now - self._start:.1f} s in all, first batch included)'))
    return rate
