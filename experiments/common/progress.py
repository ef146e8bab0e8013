"""Progress of a long loop: a bar on a terminal, dated lines in a log file.

tqdm draws a bar when its stream is a terminal; written to a file or a pipe
(``python -m ... > log``, a batch job) a bar is either off or a mess of
carriage returns. ``Progress`` prints there a plain line instead, at the first
step and then every ``interval`` seconds, so progress shows within an epoch.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

__all__ = ["Progress"]


class Progress:
  """Steps done of ``total``, with a few named values (loss, samples/s).

  Arguments:
    total: the steps of the whole run.
    initial: the steps already done (a resumed run).
    desc: what runs, the prefix of each line.
    enabled: False shows nothing (e.g. on all but the first process).
    interval: seconds between two lines when the stream is not a terminal.
    stream: where to write (default ``sys.stderr``).
  """

  def __init__(self, total: int, *, initial: int = 0, desc: str = "", enabled: bool = True,
               interval: float = 30.0, stream=None):
    self.stream = stream or sys.stderr
    self.total, self.desc, self.interval, self.enabled = total, desc, interval, enabled
    self.bar = None
    if enabled and self.stream.isatty():
      self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=self.stream)
    self.last_line = None

  def update(self, step: int, **values: str) -> None:
    """Marks ``step`` (the count of steps done) with ``values`` shown beside it."""
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      if values:
        self.bar.set_postfix(values, refresh=False)
    elif self.enabled and (self.last_line is None
                           or time.monotonic() - self.last_line >= self.interval):
      self.last_line = time.monotonic()
      shown = "".join(f", {name} {value}" for name, value in values.items())
      self.write(f"{self.desc}: step {step}/{self.total}{shown}")

  def write(self, line: str) -> None:
    """A line that stays (above the bar on a terminal)."""
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(line, file=self.stream)
    else:
      print(line, file=self.stream, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
