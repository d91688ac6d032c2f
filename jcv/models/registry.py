"""Model registry: create models by name, list them, attach model cards.

A family registers itself: a module in the ``jcv.models`` package whose factories carry
``@register(ModelCard(...))`` is found and imported once, the first time a name is looked
up (:func:`discover`); no import list to keep by hand.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

import flax.linen as nn

__all__ = ["ModelCard", "register", "create", "list_models", "get_card", "discover"]


@dataclasses.dataclass(frozen=True)
class ModelCard:
  """What a user wants to know about an architecture before using it."""
  name: str
  paper: str = ""
  year: int | None = None
  reference_params: int | None = None  # trainable params at num_classes=1000 (or default)
  input_size: int = 224
  default_num_classes: int = 1000
  notes: str = ""

  def describe(self) -> str:
    """The card as a few printable lines."""
    ref = f"{self.reference_params:,}" if self.reference_params is not None else "-"
    lines = [f"{self.name}: {self.paper}" + (f" ({self.year})" if self.year else ""),
             f"  reference params: {ref} (at {self.default_num_classes} classes), "
             f"input {self.input_size}x{self.input_size}"]
    if self.notes:
      lines.append(f"  notes: {self.notes}")
    return "\n".join(lines)


_REGISTRY: dict[str, tuple[Callable[..., nn.Module], ModelCard]] = {}


def register(card: ModelCard):
  """Decorator: ``@register(ModelCard("resnet18", ...))`` on a factory ``f(*, num_classes, **options)``."""
  def deco(factory):
    if card.name in _REGISTRY:
      raise ValueError(f"model {card.name!r} registered twice")
    _REGISTRY[card.name] = (factory, card)
    return factory
  return deco


def _lookup(name: str):
  _ensure_loaded()
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
  return _REGISTRY[name]


def create(name: str, *, num_classes: int | None = None, **options) -> nn.Module:
  """Builds a registered model. ``num_classes=0`` returns pooled features (timm convention)."""
  factory, card = _lookup(name)
  if num_classes is None:
    num_classes = card.default_num_classes
  if not isinstance(num_classes, int) or num_classes < 0:
    raise ValueError(f"num_classes must be an int >= 0 (0: pooled features), got {num_classes!r}")
  try:
    return factory(num_classes=num_classes, **options)
  except TypeError as e:  # an option the model's dataclass does not have
    raise ValueError(f"model {name!r} got an unsupported option ({e}); see "
                     f"help(jcv.models.{getattr(factory, '__module__', '').rsplit('.', 1)[-1]}"
                     f".{getattr(factory, '__name__', name)})") from e


def get_card(name: str) -> ModelCard:
  """The :class:`ModelCard` of a registered model (ValueError listing the names if unknown)."""
  return _lookup(name)[1]


def list_models() -> list[str]:
  """Sorted names of every registered model."""
  _ensure_loaded()
  return sorted(_REGISTRY)


_DISCOVERED: set[str] = set()


def discover(package: str = "jcv.models") -> list[str]:
  """Imports every module of ``package`` once, which runs their ``@register`` decorators.

  Returns the module names imported by this call. Modules whose name starts with ``_``
  are skipped.
  """
  if package in _DISCOVERED:
    return []
  _DISCOVERED.add(package)  # first, so a module importing the package does not recurse
  try:
    root = importlib.import_module(package)
    names = [f"{package}.{m.name}" for m in pkgutil.iter_modules(root.__path__)
             if not m.name.startswith("_")]
    for name in names:
      importlib.import_module(name)
  except BaseException:
    _DISCOVERED.discard(package)
    raise
  return names


def _ensure_loaded():
  discover()
