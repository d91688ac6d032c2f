"""Checks a value against a dataclass field's declared type (``Config.set``, ``--set``).

Generic over the annotations, so it follows the fields wherever they live: ``name`` may be
dotted (``"optim.learning_rate"``) to reach a field of a nested dataclass.
"""
from __future__ import annotations

import dataclasses
import types
import typing

__all__ = ["check_field_value"]


def _field_type(cls, name: str):
  head, _, rest = name.partition(".")
  hints = typing.get_type_hints(cls)
  if head not in hints:
    raise ValueError(f"unknown config field {name!r}")
  tp = hints[head]
  if rest:
    inner = next((a for a in _options(tp) if dataclasses.is_dataclass(a)), None)
    if inner is None:
      raise ValueError(f"config field {head!r} has no sub-field {rest!r}")
    return _field_type(inner, rest)
  return tp


def _options(tp) -> tuple:
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    return typing.get_args(tp)
  return (tp,)


def _describe(tp) -> str:
  names = []
  for t in _options(tp):
    t = typing.get_origin(t) or t
    names.append("None" if t is type(None) else getattr(t, "__name__", str(t)))
  return " or ".join(names)


def _conforms(t, value) -> tuple[bool, typing.Any]:
  origin = typing.get_origin(t) or t
  if t is typing.Any:
    return True, value
  if t is type(None):
    return value is None, value
  if origin is bool:
    return isinstance(value, bool), value
  if origin is int:
    return isinstance(value, int) and not isinstance(value, bool), value
  if origin is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return ok, float(value) if ok else value
  if origin is str:
    return isinstance(value, str), value
  if origin in (tuple, list):  # a bare string/number is a 1-tuple (--set optim.freeze=head)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
      return True, (value,)
    return isinstance(value, (tuple, list)), value
  if origin is dict:
    return isinstance(value, dict), value
  if dataclasses.is_dataclass(origin):
    return isinstance(value, (origin, dict)), value
  return True, value  # an annotation this check does not know: leave it to validate()


def check_field_value(cls, name: str, value):
  """``value`` (converted: an int for a float field becomes a float) if it fits the declared
  type of field ``name`` of dataclass ``cls``; else ValueError naming field, type and value."""
  tp = _field_type(cls, name)
  is_sequence = lambda t: (typing.get_origin(t) or t) in (tuple, list)
  for option in sorted(_options(tp), key=is_sequence):  # "pretrained" is the literal, not a 1-tuple
    ok, converted = _conforms(option, value)
    if ok:
      return converted
  shown = repr(value) if not isinstance(value, str) else f"the text {value!r}"
  raise ValueError(f"{name} must be {_describe(tp)}, got {shown}")
