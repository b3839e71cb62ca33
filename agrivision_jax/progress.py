"""Rate-limited progress lines for long passes over a split: count, tiles/s and ETA.

The rate is measured from the end of the first batch, so the compilation that the first batch
pays for does not drag the rate and the ETA down for the whole run.
"""

import time

from absl import logging


def format_progress(what: str, done: int, total: int, rate: float) -> str:
  """'predict val: 120/400 tiles  10.3 tiles/s  ETA 0:00:27' (ETA of the remaining tiles)."""
  eta = int(round((total - done) / rate)) if rate > 0 else 0
  minutes, seconds = divmod(max(eta, 0), 60)
  hours, minutes = divmod(minutes, 60)
  return (f'{what}: {done}/{total} tiles  {rate:.1f} tiles/s  '
          f'ETA {hours:d}:{minutes:02d}:{seconds:02d}')


class Progress:
  """Logs ``format_progress`` at most every ``interval_s`` seconds, and once more at the end."""

  def __init__(self, what: str, total: int, interval_s: float = 10.0):
    """Args: what: prefix of the line; total: the number of tiles expected; interval_s: the least
    time between two lines."""
    self._what, self._total, self._interval_s = what, total, interval_s
    self._start = self._last = time.perf_counter()
    self._first: tuple[float, int] | None = None   # (time, tiles done) after the first batch
    self.done = 0

  def rate(self, now: float) -> float:
    """Tiles per second since the first batch (over the whole run while there is one batch)."""
    if self._first is None or self.done == self._first[1] or now <= self._first[0]:
      return self.done / max(now - self._start, 1e-9)
    return (self.done - self._first[1]) / (now - self._first[0])

  def update(self, count: int) -> None:
    """Records ``count`` more tiles done; logs a line if ``interval_s`` has passed."""
    self.done += count
    now = time.perf_counter()
    if self._first is None:
      self._first = (now, self.done)
    if now - self._last >= self._interval_s:
      self._last = now
      logging.info(format_progress(self._what, self.done, self._total, self.rate(now)))

  def finish(self) -> float:
    """Logs the final line; returns the steady-state tiles per second (``rate``)."""
    now = time.perf_counter()
    rate = self.rate(now)
    logging.info(format_progress(self._what, self.done, self._total, rate) +
                 f'  ({now - self._start:.1f} s in all, first batch included)')
    return rate
