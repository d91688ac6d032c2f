"""A run's configuration: one frozen dataclass of sections, each grouped by concern.

::

  Config(data=Data(dataset="../shared/data/cifar10", image_size=32),
         model=Model(name="resnet20"), optim=Optim(name="sgd", learning_rate=0.1),
         run=Run(length="10 epochs"))
  config.replace(optim={"learning_rate": 0.05}, run={"length": "3 epochs"})  # a section's fields
  config.set(["optim.learning_rate=0.05", "data.image_size=64"])             # what --set passes
  config.replace(run={"phases": (Phase(length="15 epochs", trainable="head"), Phase(length="5 epochs")))

The sections and their fields are in jcv.train.sections; durations (``"8 epochs"``) in
jcv.train.durations. ``config.json`` holds ``to_dict()`` with the jcv version that wrote it.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import json
from typing import Any

from jcv.train import durations
from jcv.train.fieldtypes import check_field_value
from jcv.train.sections import (Augment, Data, EarlyStopping, Evaluation, FeatureCache, Init, Lookahead, Model, Muon,
                                Optim, Phase, Plateau, Pretrained, Run, Schedule, Whiten)

__all__ = ["Config", "CONFIG_FORMAT", "Data", "Augment", "Model", "Init", "Pretrained", "Whiten", "FeatureCache",
           "Optim", "Muon", "Lookahead", "Schedule", "Plateau", "Evaluation", "EarlyStopping", "Run", "Phase"]

CONFIG_FORMAT = 2  # the layout of config.json; a file without it was written by jcv <= 0.1.0
# Section-valued fields that may be None, and the type a dict for them builds.
_OPTIONAL = {("init", "pretrained"): Pretrained, ("init", "whiten"): Whiten,
             ("init", "feature_cache"): FeatureCache, ("optim", "muon"): Muon, ("optim", "lookahead"): Lookahead,
             ("schedule", "plateau"): Plateau, ("evaluation", "early_stopping"): EarlyStopping}


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run varies, by concern. Defaults train a small CIFAR-style classifier."""
  data: Data = Data()
  augment: Augment = Augment()
  model: Model = Model()
  init: Init = Init()
  optim: Optim = Optim()
  schedule: Schedule = Schedule()
  evaluation: Evaluation = Evaluation()
  run: Run = Run()

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if isinstance(value, dict):
        object.__setattr__(self, f.name, _build(type(getattr(Config, f.name)), value, f.name))

  # ------------------------------------------------------------ deriving configs

  def replace(self, **sections) -> "Config":
    """A copy with sections changed: a section object replaces it whole, a dict changes the
    named fields of the current one (``replace(optim={"learning_rate": 0.05})``)."""
    changes = {}
    for name, value in sections.items():
      if name not in _SECTIONS:
        raise ValueError(f"unknown config section {name!r}{_close(name, _SECTIONS)}; sections: {', '.join(_SECTIONS)}")
      if isinstance(value, dict):
        value = _merged(getattr(self, name), value, name)
      changes[name] = value
    return dataclasses.replace(self, **changes)

  def set(self, assignments) -> "Config":
    """Applies ``section.field=value`` strings in order (``--set``); values are Python literals,
    else text. ``optim.muon.momentum=0.6`` reaches a nested section's field."""
    config = self
    for item in assignments:
      if "=" not in item:
        raise ValueError(f"--set expects section.field=value, got {item!r}")
      key, raw = (part.strip() for part in item.split("=", 1))
      config = config.set_path(key, _parse_value(raw))
    return config

  def set_path(self, key: str, value) -> "Config":
    """A copy with the field at dotted path ``key`` set to ``value``, type-checked."""
    path = key.split(".")
    if path[:2] == ["run", "phases"]:
      return self._set_phase(path[1:], value, key)
    _check_path(path, key)
    value = check_field_value(Config, key, value)
    if dataclasses.is_dataclass(_annotation_at(path)) and isinstance(value, dict):
      value = _build(_annotation_at(path), value, key)
    return self.replace(**{path[0]: _with_path(getattr(self, path[0]), path[1:], value, key)})

  def _set_phase(self, path, value, key):
    if len(path) == 1:
      return self.replace(run={"phases": tuple(value)})
    if len(path) != 3 or not path[1].isdigit() or int(path[1]) >= len(self.run.phases):
      raise ValueError(f"--set {key}: phases take run.phases.<index>.<field> with an index below {len(self.run.phases)}")
    phases = list(self.run.phases)
    i = int(path[1])
    phases[i] = _merged(phases[i], {path[2]: value}, f"run.phases.{i}")
    return self.replace(run={"phases": tuple(phases)})

  def with_length(self, length: str) -> "Config":
    """``run.length`` set; with phases given in epochs, each phase's share of the recipe's
    epochs scaled to ``length`` (rounded at the phase boundaries)."""
    total = durations.epochs_of(length)
    epochs = [durations.epochs_of(p.length) for p in self.run.phases]
    if not self.run.phases or total is None or None in epochs:
      return self.replace(run={"length": length})
    whole, done, scaled = sum(epochs), 0.0, []
    for e in epochs:
      done += e
      scaled.append(round(total * done / whole) - sum(scaled))
    phases = tuple(dataclasses.replace(p, length=durations.scaled(p.length, n)) for p, n in zip(self.run.phases, scaled)
                   if n > 0)
    return self.replace(run={"phases": phases, "length": length})

  def phase_configs(self) -> list["Config"]:
    """One Config per phase (``[self]`` without phases): the run's sections with the phase's
    changes; ``run.length`` is the phase's length."""
    if not self.run.phases:
      return [self]
    out = []
    for p in self.run.phases:
      init = {k: getattr(p, k) for k in ("trainable", "backbone_lr_multiplier") if getattr(p, k) is not None}
      out.append(dataclasses.replace(
          self, run=dataclasses.replace(self.run, length=p.length, phases=()),
          init=dataclasses.replace(self.init, **init),
          optim=self.optim if p.learning_rate is None else dataclasses.replace(self.optim, learning_rate=p.learning_rate),
          schedule=self.schedule if p.warmup is None else dataclasses.replace(self.schedule, warmup=p.warmup)))
    return out

  # ------------------------------------------------------------ JSON

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly nested dict (tuples become lists), with ``format``."""
    return {"format": CONFIG_FORMAT, **json.loads(json.dumps(dataclasses.asdict(self)))}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    """Inverse of ``to_dict``; a config.json of another layout is refused in one line."""
    d = dict(d)
    if d.pop("format", None) != CONFIG_FORMAT:
      raise ValueError(f"this config.json was written by jcv 0.1.0 (flat fields); jcv {_version()} reads "
                       f"config format {CONFIG_FORMAT}: re-run the command that made it, or move the run aside "
                       "with --restart")
    unknown = set(d) - set(_SECTIONS)
    if unknown:
      raise ValueError(f"unknown config section(s) {sorted(unknown)} in saved config")
    return cls(**_to_tuple(d))

  def validate(self) -> "Config":
    """Raises ValueError on inconsistent settings; returns self."""
    for name in _SECTIONS:
      getattr(self, name).validate()
    view = self.evaluation.image_size or self.data.image_size
    if self.evaluation.tta_multicrop and self.evaluation.tta_multicrop > view:
      raise ValueError(f"evaluation.tta_multicrop {self.evaluation.tta_multicrop} exceeds the evaluation view "
                       f"({view} px): crops come from inside it")
    for i, phase in enumerate(self.run.phases):
      try:
        phase.validate()
        if phase.trainable is not None:
          dataclasses.replace(self.init, trainable=phase.trainable).validate()
      except ValueError as e:
        raise ValueError(f"phase {i}: {e}") from None
    return self


_SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _version() -> str:
  from importlib import metadata
  try:
    return metadata.version("jcv")
  except metadata.PackageNotFoundError:
    return "0.2"


def _close(name, names) -> str:
  match = difflib.get_close_matches(name, list(names), n=1)
  return f" (did you mean {match[0]!r}?)" if match else ""


def _field_names(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls)]


def _build(cls, values: dict, where: str):
  """``cls(**values)`` with nested section dicts built too; unknown names raise ValueError."""
  unknown = set(values) - set(_field_names(cls))
  if unknown:
    name = sorted(unknown)[0]
    raise ValueError(f"{where}: unknown field {name!r}{_close(name, _field_names(cls))}; "
                     f"fields: {', '.join(_field_names(cls))}")
  values = dict(values)
  for (section, field), inner in _OPTIONAL.items():
    if cls is type(getattr(Config, section)) and isinstance(values.get(field), dict):
      values[field] = _build(inner, values[field], f"{where}.{field}")
  return cls(**_to_tuple(values))


def _merged(section, changes: dict, where: str):
  return _build(type(section), {**{f: getattr(section, f) for f in _field_names(type(section))}, **changes}, where)


def _annotation_at(path):
  import typing
  cls = Config
  for name in path:
    hints = typing.get_type_hints(cls)
    options = typing.get_args(hints[name]) or (hints[name],)
    cls = next((t for t in options if dataclasses.is_dataclass(t)), hints[name])
  return cls


def _check_path(path, key):
  cls = Config
  for depth, name in enumerate(path):
    names = _field_names(cls) if dataclasses.is_dataclass(cls) else []
    if name not in names:
      what = "section" if depth == 0 else "field"
      hint = _close(name, names) or _flat_hint(name) if depth == 0 else _close(name, names)
      raise ValueError(f"--set {key}: unknown {what} {name!r}{hint}; expected one of {', '.join(names)}")
    cls = _annotation_at(path[:depth + 1])
  if len(path) == 1:
    raise ValueError(f"--set {key}: name a field of the section, e.g. {key}.{_field_names(cls)[0]}=...")


def _flat_hint(name) -> str:
  """' (did you mean 'optim.learning_rate'?)' for a field name given without its section."""
  hits = [f"{s}.{name}" for s in _SECTIONS if name in _field_names(type(getattr(Config, s)))]
  return f" (did you mean {hits[0]!r}?)" if hits else ""


def _with_path(section, path, value, key):
  if len(path) == 1:
    return _merged(section, {path[0]: value}, key)
  inner = getattr(section, path[0])
  if inner is None:
    inner = _OPTIONAL[(key.split(".")[0], path[0])]()
  return _merged(section, {path[0]: _with_path(inner, path[1:], value, key)}, key)


def _parse_value(raw: str):
  try:
    return _to_tuple(ast.literal_eval(raw))
  except (ValueError, SyntaxError):
    if raw.lower() in ("true", "false"):
      return raw.lower() == "true"
    if raw.lower() in ("none", "null"):
      return None
    return raw


def _to_tuple(v):
  if isinstance(v, list):
    return tuple(_to_tuple(x) for x in v)
  if isinstance(v, dict):
    return {k: _to_tuple(x) for k, x in v.items()}
  return v
