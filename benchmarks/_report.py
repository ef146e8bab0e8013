"""What the benchmark scripts share: their sections of BENCHMARKS.md and the CPU's name.

Imported as ``benchmarks._report`` (tests, or the repository root on the path) or
as ``_report`` (a script run as ``python benchmarks/<script>.py``, whose folder
is then on the path).
"""

from __future__ import annotations

import pathlib
import platform
import re


def markers(name: str) -> tuple[str, str]:
  """The start and end markers of section ``name`` of BENCHMARKS.md."""
  return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: pathlib.Path, section: str, *, name: str) -> None:
  """Replaces section ``name`` of ``path`` with ``section``, appending it if absent.

  Other scripts own other sections of the same file, so everything outside the
  markers is kept. A missing file starts with a ``# Benchmarks`` title.
  """
  start, end = markers(name)
  block = f"{start}\n{section.rstrip(chr(10))}\n{end}\n"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: block, text, count=1)  # a function: no escape processing
  else:
    text = text.rstrip("\n") + "\n\n" + block
  path.write_text(text)


def cpu_name() -> str:
  """The CPU model: ``platform.processor()`` is often empty or just "x86_64" on Linux."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
