"""Rate-limited progress lines for long passes over a split: count, items/s and ETA."""

import time

from absl import logging


def format_progress(what: str, done: int, total: int, elapsed: float) -> str:
  """'predict val: 120/400 tiles  10.3 tiles/s  ETA 0:00:27' (ETA of the remaining items)."""
  rate = done / elapsed if elapsed > 0 else 0.0
  eta = int(round((total - done) / rate)) if rate > 0 else 0
  minutes, seconds = divmod(max(eta, 0), 60)
  hours, minutes = divmod(minutes, 60)
  return (f'{what}: {done}/{total} tiles  {rate:.1f} tiles/s  '
          f'ETA {hours:d}:{minutes:02d}:{seconds:02d}')


class Progress:
  """Logs ``format_progress`` at most every ``interval_s`` seconds, and once more at the end."""

  def __init__(self, what: str, total: int, interval_s: float = 10.0):
    """Args: what: prefix of the line; total: the number of items expected; interval_s: the least
    time between two lines."""
    self._what, self._total, self._interval_s = what, total, interval_s
    self._start = self._last = time.perf_counter()
    self.done = 0

  def update(self, count: int) -> None:
    """Records ``count`` more items done; logs a line if ``interval_s`` has passed."""
    self.done += count
    now = time.perf_counter()
    if now - self._last >= self._interval_s:
      self._last = now
      logging.info(format_progress(self._what, self.done, self._total, now - self._start))

  def finish(self) -> float:
    """Logs the final line; returns the elapsed seconds."""
    elapsed = time.perf_counter() - self._start
    logging.info(format_progress(self._what, self.done, self._total, elapsed))
    return elapsed
