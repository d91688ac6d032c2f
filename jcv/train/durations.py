"""Durations: every length in a Config is written the same way and resolved by :func:`steps`.

A duration is a text ``"<number> <unit>"`` with unit ``steps``, ``epochs`` or ``examples``
(singular forms too): ``"8 epochs"``, ``"0.5 epochs"``, ``"200 steps"``, ``"10000 examples"``.
Training length, warmup, phase length, checkpoint, log and evaluation intervals, the
squeezed schedules of parameter groups and the BatchNorm re-estimation all use it (as
big_vision's ``utils.steps()`` resolves ``total_steps``/``total_epochs``/``total_examples``).
"""
from __future__ import annotations

import math

__all__ = ["UNITS", "parse", "check", "steps", "examples", "epochs_of", "scaled"]

UNITS = ("steps", "epochs", "examples")


def parse(duration: str) -> tuple[float, str]:
  """``"8 epochs"`` -> ``(8.0, "epochs")``; ValueError naming the text otherwise."""
  if not isinstance(duration, str):
    raise ValueError(f"a duration is a text like '8 epochs', '200 steps' or '10000 examples', got {duration!r}")
  parts = duration.split()
  unit = parts[1] if len(parts) == 2 else ""
  unit = unit if unit.endswith("s") else unit + "s"
  try:
    number = float(parts[0]) if parts else math.nan
  except ValueError:
    number = math.nan
  if len(parts) != 2 or unit not in UNITS or not number >= 0 or math.isinf(number):
    raise ValueError(f"a duration is a number >= 0 and a unit ({', '.join(UNITS)}), e.g. '8 epochs'; "
                     f"got {duration!r}")
  return number, unit


def check(name: str, duration: str | None, *, positive: bool = True, allow_none: bool = False) -> None:
  """ValueError naming field ``name`` unless ``duration`` parses (and is > 0 if ``positive``)."""
  if duration is None and allow_none:
    return
  try:
    number, _ = parse(duration)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  if positive and number <= 0:
    raise ValueError(f"{name} must be longer than 0, got {duration!r}")


def steps(duration: str, *, steps_per_epoch: int, batch_size: int) -> int:
  """The number of optimizer steps ``duration`` lasts (epochs and examples rounded to the
  nearest step; a positive duration lasts at least one step)."""
  number, unit = parse(duration)
  exact = {"steps": number, "epochs": number * steps_per_epoch, "examples": number / batch_size}[unit]
  count = int(round(exact))
  return max(count, 1) if number > 0 else 0


def examples(duration: str, *, steps_per_epoch: int, batch_size: int) -> int:
  """The number of examples ``duration`` covers (``"10000 examples"`` -> 10000)."""
  number, unit = parse(duration)
  if unit == "examples":
    return int(round(number))
  return steps(duration, steps_per_epoch=steps_per_epoch, batch_size=batch_size) * batch_size


def epochs_of(duration: str) -> float | None:
  """The number of epochs of a duration given in epochs, else None."""
  number, unit = parse(duration)
  return number if unit == "epochs" else None


def scaled(duration: str, number: float) -> str:
  """``duration`` with its number replaced (``scaled("8 epochs", 3)`` -> ``"3 epochs"``)."""
  _, unit = parse(duration)
  return f"{number:g} {unit}"
