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
flag.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from absl import flags

__all__ = ["field", "define_flags", "config_from_flags"]

# The flags that define_flags defines belong to its caller (the script), so that the
# script's --help lists them; absl would otherwise credit this module.
flags.disclaim_key_flags()

_DEFINE = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


def field(default, help: str, *, choices: Sequence[str] | None = None,
          parse: Callable[[str], object] | None = None, format: Callable[[object], str] = str):
  """A dataclass field that carries its flag's help.

  Arguments:
    default: the field's default (bool, int, float, str, or a tuple of them).
    help: the flag's help text.
    choices: for a str field, the values the flag accepts (an enum flag).
    parse: for a tuple field, reads one list entry (default: the type of the
      default's first entry).
    format: for a tuple field, writes one default entry as the flag shows it.
  """
  metadata = {"help": help, "format": format}
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
