"""absl flags from a frozen dataclass ``Config``, and the ``Config`` back from them.

Each experiment keeps everything a run depends on in one ``Config``: one flag
per field, named as the field, with the field's default and help::

  @dataclasses.dataclass(frozen=True)
  class Config:
    steps: int = config_flags.field(300, "optimizer steps")
    densities: tuple = config_flags.field((1.0, 0.25), "densities to sweep",
                                          parse=float)

  config_flags.define_flags(Config)          # before app.run
  config = config_flags.config_from_flags(Config)  # in main

A ``tuple`` field becomes a list flag whose entries ``parse`` reads (and
``format`` writes, for the default); a field with ``choices`` becomes an enum
flag. A number field may carry its range (``at_least``, ``above``,
``at_most``), which ``check`` enforces, with every float field finite: each
script checks its whole ``Config`` before any work, and a bad value gets a
``ConfigError`` that names the flag and the allowed range.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

__all__ = ["ConfigError", "field", "define_flags", "config_from_flags", "check",
           "parse_flags", "one_line_errors", "launch"]

# The flags that define_flags defines belong to its caller (the script), so that the
# script's --help lists them; absl would otherwise credit this module.
flags.disclaim_key_flags()

_DEFINE = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


class ConfigError(ValueError):
  """A configuration value out of its range: the message names the flag (``--name``)."""


def field(default, help: str, *, choices: Sequence[str] | None = None,
          parse: Callable[[str], object] | None = None, format: Callable[[object], str] = str,
          at_least: float | None = None, above: float | None = None,
          at_most: float | None = None):
  """A dataclass field that carries its flag's help and its allowed values.

  Arguments:
    default: the field's default (bool, int, float, str, or a tuple of them).
    help: the flag's help text.
    choices: for a str field, the values the flag accepts (an enum flag).
    parse: for a tuple field, reads one list entry (default: the type of the
      default's first entry).
    format: for a tuple field, writes one default entry as the flag shows it.
    at_least, above, at_most: for a number field (or each entry of a tuple of
      numbers), its range: ``>= at_least``, ``> above``, ``<= at_most``.
  """
  if at_least is not None and above is not None:
    raise TypeError("give at most one of at_least and above")
  metadata = {"help": help, "format": format, "at_least": at_least, "above": above,
              "at_most": at_most}
  if choices is not None:
    metadata["choices"] = tuple(choices)
  if parse is not None:
    metadata["parse"] = parse
  return dataclasses.field(default=default, metadata=metadata)


def define_flags(config_cls, *, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one flag per field of ``config_cls``, with the field's default and help."""
  defaults = config_cls()
  for f in dataclasses.fields(config_cls):
    default, meta = getattr(defaults, f.name), f.metadata
    help_text = meta.get("help", f"{config_cls.__name__}.{f.name}")
    if isinstance(default, tuple):
      flags.DEFINE_list(f.name, [meta.get("format", str)(v) for v in default], help_text,
                        flag_values=flag_values)
    elif "choices" in meta:
      flags.DEFINE_enum(f.name, default, meta["choices"], help_text, flag_values=flag_values)
    elif type(default) in _DEFINE:
      _DEFINE[type(default)](f.name, default, help_text, flag_values=flag_values)
    else:
      raise TypeError(f"{config_cls.__name__}.{f.name}: no flag type for a default of type "
                      f"{type(default).__name__}")


def config_from_flags(config_cls, *, flag_values: flags.FlagValues = flags.FLAGS):
  """The ``config_cls`` of the parsed flags (``define_flags`` defined them)."""
  defaults = config_cls()
  values = {}
  for f in dataclasses.fields(config_cls):
    value, default = getattr(flag_values, f.name), getattr(defaults, f.name)
    if isinstance(default, tuple):
      parse = f.metadata.get("parse") or (type(default[0]) if default else str)
      value = tuple(parse(v) for v in value)
    values[f.name] = value
  return config_cls(**values)


def _range_text(meta) -> str:
  low, above, high = meta.get("at_least"), meta.get("above"), meta.get("at_most")
  if (low is not None or above is not None) and high is not None:
    return f"in {'[' if above is None else '('}{low if above is None else above}, {high}]"
  if high is not None:
    return f"<= {high}"
  return f">= {low}" if above is None else f"> {above}"


def _check_value(name: str, value, meta) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    if "choices" in meta and value not in meta["choices"]:
      raise ConfigError(f"--{name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    return
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f"--{name} must be a finite number, got {value}")
  low, above, high = meta.get("at_least"), meta.get("above"), meta.get("at_most")
  if ((low is not None and value < low) or (above is not None and value <= above)
      or (high is not None and value > high)):
    raise ConfigError(f"--{name} must be {_range_text(meta)}, got {value}")


def check(config) -> None:
  """Raises ``ConfigError`` naming the first field of ``config`` outside its range or choices.

  Every float must be finite; a field made with ``at_least``/``above``/
  ``at_most`` must lie in that range (each entry, for a tuple); one with
  ``choices`` must be one of them.
  """
  for f in dataclasses.fields(config):
    value = getattr(config, f.name)
    for entry in (value if isinstance(value, tuple) else (value,)):
      _check_value(f.name, entry, f.metadata)


def _fail(message: str, status: int) -> None:
  print(f"error: {' '.join(message.split())}", file=sys.stderr)
  sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run``'s ``flags_parser``: a bad or unknown flag gets one line and exit status 2.

  (absl's own parser prints the error with a usage hint and exits with 1.)
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(f"{e}; --helpfull lists the flags", 2)


@contextlib.contextmanager
def one_line_errors(*, debug: bool = False):
  """Turns the errors a user can fix into one line on stderr and an exit status.

  ``ValueError`` (bad flags, data, checkpoints: the message names the flag or
  file) and ``OSError`` (a missing or unreadable file) exit with 2, a
  ``FloatingPointError`` (a run that diverged) with 1. With ``debug``, or for
  any other exception (a bug), the traceback is printed as usual.
  """
  try:
    yield
  except (ValueError, OSError) as e:
    if debug:
      raise
    _fail(str(e), 2)
  except FloatingPointError as e:
    if debug:
      raise
    _fail(str(e), 1)


def launch(define_flags: Callable[[], None], main: Callable[[list[str]], None]) -> None:
  """Defines a script's flags and runs its ``main`` with ``parse_flags``: a console script."""
  define_flags()
  app.run(main, flags_parser=parse_flags)
