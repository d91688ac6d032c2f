"""Run configuration: one dataclass holding everything a training run varies.

Presets are plain ``Config`` instances; ``Config.replace`` and ``Config.set`` (from
``key=value`` strings, as the CLI's ``--set`` passes them) derive variants.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import types
from typing import Any

from jcv.train.fieldtypes import check_field_value

__all__ = ["Config", "LOOKAHEAD", "lookahead_options"]


@dataclasses.dataclass(frozen=True)
class Config:
  """Every field a run varies. Defaults train a small CIFAR-style classifier."""
  # --- data ---
  dataset: str = "cifar10"            # tfds name or image-folder path (see jcv.data.sources.resolve)
  data_dir: str | None = None         # tfds data_dir, or the parent of an image folder
  train_split: str = "train"
  eval_split: str = "test"            # "" disables evaluation
  val_fraction: float | None = None   # carve a validation split from train (image folders)
  source_options: dict = dataclasses.field(default_factory=dict)  # image_folder options, e.g. {"cache": False}
  image_size: int = 32
  crop: str = "none"                  # host crop: random_resized | pad_crop | none (resize + centre crop)
  crop_scale: tuple = (0.08, 1.0)     # random_resized: range of the crop's area fraction
  host_flip: str = "none"             # none | random | alternate (airbench: mirrored every other epoch)
  num_workers: int = 0                # grain worker processes (0 = in-process)
  augment: tuple = ("flip", ("pad_crop", {"padding": 4}))  # on-device ops for make_augment
  mean: tuple | None = (0.4914, 0.4822, 0.4465)  # on [0, 1] images; None = no normalisation
  std: tuple | None = (0.2470, 0.2435, 0.2616)
  # --- model ---
  model: str = "resnet20"
  model_options: dict = dataclasses.field(default_factory=dict)
  num_classes: int | None = None      # None = number of classes of the training source
  dtype: str = "float32"              # compute dtype: float32 | bfloat16 (params stay float32)
  # --- loss ---
  label_smoothing: float = 0.0
  # --- optimizer (jcv.train.optim.OPTIMIZERS, SCHEDULES: names, options and their defaults) ---
  optimizer: str = "sgd"              # sgd | adamw | rmsprop | lamb | muon (conv kernels; the rest: its fallback)
  optimizer_options: dict = dataclasses.field(default_factory=dict)  # e.g. {"momentum": 0.9, "nesterov": True}
  learning_rate: float = 0.1          # peak learning rate
  weight_decay: float = 5e-4
  weight_decay_mode: str = "decoupled"  # decoupled (optax, lr-scaled) | l2 (lambda/2 ||w||^2 in the loss)
  decay_bn_and_bias: bool = False     # False: no decay on BN scales/biases and on biases
  grad_clip_norm: float | None = None
  schedule: str = "cosine"            # cosine | onecycle | triangle | linear | step | constant
  schedule_options: dict = dataclasses.field(default_factory=dict)  # e.g. {"final_lr_fraction": 0.1}
  warmup_epochs: float = 0.0
  # --- initial weights and what trains (transfer learning) ---
  init_from: dict = dataclasses.field(default_factory=dict)  # init steps, e.g. {"pretrained": {"weights": FILE}} (jcv.train.init_from)
  trainable: Any = "all"              # "all" | "head" (frozen backbone) | N (top N stages + head, BN in inference mode) | "backbone" (every stage, BN in inference mode)
  backbone_lr_multiplier: float = 1.0  # trainable=N: the backbone's rate = learning_rate x this
  feature_cache: dict | None = None   # trainable="head"/N: frozen bottom's features computed once ({"flip": True, "crop_views": 0, "stage": -3})
  phases: tuple = ()                  # run phases in order, each a dict of field changes (e.g. epochs, trainable, learning_rate)
  # --- parameter groups ---
  freeze: tuple = ()                  # regexes on "/"-joined param paths: not trained, BN stats kept
  lr_multipliers: dict = dataclasses.field(default_factory=dict)  # regex -> lr multiplier
  group_epochs: dict = dataclasses.field(default_factory=dict)  # lr_multipliers regex -> N: whole schedule in N epochs, then 0
  lookahead: dict = dataclasses.field(default_factory=dict)  # airbench's lookahead, e.g. {"every": 5} (LOOKAHEAD)
  # --- run length and parallelism ---
  epochs: int = 10
  steps: int | None = None            # stop after this many optimizer steps in total
  batch_size: int = 128               # global batch (all devices of all processes)
  eval_batch_size: int | None = None  # default: batch_size
  seed: int = 0
  parallel: str = "jit"               # jit (Mesh + NamedSharding, GSPMD) | pmap (shard_map, explicit pmean)
  sync_batch_stats: bool = True       # pmap: BatchNorm over the global batch (False: per device, as jax.pmap)
  max_steps_in_flight: int = 16       # block on results at least this often (<= 30)
  # --- checkpoints, logs ---
  checkpoint_every: int | None = None  # steps; checkpoints are also saved at every epoch end
  keep_checkpoints: int = 2           # last k kept, plus the best by best_metric
  best_metric: str = "top1"           # eval metric ranking checkpoints (higher is better; "loss": lower)
  log_every: int = 50                 # steps between logged training metrics
  eval_every: int = 1                 # epochs between evaluations
  bn_recompute_images: int = 0        # >0: at the end, BN statistics averaged over this many train images
  tta_flip: bool = False              # average logits with the horizontally flipped image at eval
  tta_translate: int = 0              # >0: also average views shifted by this many pixels (airbench)
  eval_image_size: int | None = None  # eval/predict input size (None: image_size; larger: FixRes)
  eval_crop_fraction: float = 0.875   # eval view: shorter side to size / this, centre crop (1.0: no crop)
  compilation_cache: str | None = "auto"  # "auto": ~/.cache/jcv/jax (jcv.perf); None disables
  plots: bool = True
  progress: bool = True

  def __post_init__(self):
    # A single pattern / op given as a bare string (``--set freeze=backbone``) means a 1-tuple.
    for name in ("freeze", "augment"):
      value = getattr(self, name)
      if isinstance(value, (str, int, float)):
        object.__setattr__(self, name, (value,))
      elif isinstance(value, list):
        object.__setattr__(self, name, _to_tuple(value))

  def __getattr__(self, name):
    # Reads of the flat names of older configs (config.momentum, config.muon_ns_steps ...)
    # give the value the grouped options hold now.
    if name not in _LEGACY_NAMES:
      raise AttributeError(f"'Config' object has no attribute {name!r}")
    return _legacy_value(self, name)

  def phase_configs(self) -> list["Config"]:
    """One Config per phase (``[self]`` without ``phases``); a phase inherits every field it
    does not change, except ``steps`` (a run's ``steps`` budget is shared out by ``fit``)."""
    if not self.phases:
      return [self]
    return [self.replace(**{"phases": (), "steps": None, **dict(p)}) for p in self.phases]

  def with_epochs(self, epochs: int) -> "Config":
    """``epochs`` in all: without phases the field itself; with phases, each phase's share of
    the recipe's epochs scaled to ``epochs`` (rounded at the phase boundaries)."""
    if not self.phases:
      return self.replace(epochs=epochs)
    lengths = [c.epochs for c in self.phase_configs()]
    total, done, scaled = sum(lengths), 0, []
    for length in lengths:
      done += length
      scaled.append(round(epochs * done / total) - sum(scaled))
    phases = tuple({**dict(p), "epochs": n} for p, n in zip(self.phases, scaled) if n > 0)
    return self.replace(phases=phases, epochs=epochs)

  def replace(self, **changes) -> "Config":
    """A copy with the given fields changed (unknown names raise ValueError).

    Changing ``optimizer`` or ``schedule`` without its ``*_options`` starts the options from
    the new name's defaults. Flat names of older configs (``momentum``, ``onecycle_pct_start``,
    ``muon_learning_rate`` ...) are moved into the options they now belong to.
    """
    changes = _from_legacy(self, changes)
    unknown = set(changes) - self.field_names()
    if unknown:
      raise ValueError(f"unknown config field(s) {sorted(unknown)}; expected one of {sorted(self.field_names())}")
    for name in ("optimizer", "schedule"):
      if name in changes and changes[name] != getattr(self, name) and f"{name}_options" not in changes:
        changes[f"{name}_options"] = {}
    return dataclasses.replace(self, **changes)

  def set(self, assignments: list[str] | tuple[str, ...]) -> "Config":
    """Applies ``key=value`` strings in order; values are parsed as Python literals, else kept
    as strings. ``group.key=value`` sets one entry of a dict field (``optimizer_options.momentum=0.8``)."""
    config = self
    for item in assignments:
      if "=" not in item:
        raise ValueError(f"--set expects key=value, got {item!r}")
      key, raw = (part.strip() for part in item.split("=", 1))
      value = _parse_value(raw)
      field, _, sub = key.partition(".")
      if field not in config.field_names() and field not in _LEGACY_NAMES:
        raise ValueError(f"unknown config field {field!r}; expected one of {sorted(config.field_names())}")
      if sub:
        current = getattr(config, field, None)
        if not isinstance(current, dict):
          raise ValueError(f"--set {key}: {field} is not a dict field")
        value = {**current, sub: value}
      elif field in config.field_names():
        value = check_field_value(type(config), field, value)  # type-checked against the field
      config = config.replace(**{field: value})
    return config

  @classmethod
  def field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    """Inverse of ``to_dict``; lists go back to tuples, unknown keys are rejected. Reads the
    config.json of older runs too (flat optimizer/schedule fields, see ``replace``)."""
    d = {k: _to_tuple(v) for k, v in d.items()}
    unknown = set(d) - cls.field_names() - _LEGACY_NAMES
    if unknown:
      raise ValueError(f"unknown config field(s) {sorted(unknown)} in saved config")
    legacy = {k: d.pop(k) for k in list(d) if k in _LEGACY_NAMES}
    base = cls(**{k: v for k, v in d.items() if k not in ("optimizer_options", "schedule_options")})
    options = {k: d[k] for k in ("optimizer_options", "schedule_options") if k in d}
    return dataclasses.replace(base, **_from_legacy(base, {**options, **legacy}))

  def validate(self) -> "Config":
    """Raises ValueError on inconsistent settings; returns self."""
    from jcv.train.optim import optimizer_options, schedule_options
    optimizer_options(self)  # unknown optimizer, schedule or option: ValueError naming them
    schedule_options(self)
    lookahead_options(self)
    _choice("host_flip", self.host_flip, ("none", "random", "alternate"))
    _choice("parallel", self.parallel, ("jit", "pmap"))
    _choice("weight_decay_mode", self.weight_decay_mode, ("decoupled", "l2"))
    _choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
    for op in self.augment:
      name = op if isinstance(op, str) else op[0]
      if name in ("normalize", "label_smoothing"):
        raise ValueError(f"augment op {name!r}: set Config.{'mean/std' if name == 'normalize' else name} "
                         "instead (one place for each)")
    for pattern, epochs in (self.group_epochs or {}).items():
      if pattern not in (self.lr_multipliers or {}):
        raise ValueError(f"group_epochs pattern {pattern!r} must also be an lr_multipliers key")
      if not epochs > 0:
        raise ValueError(f"group_epochs[{pattern!r}] must be > 0, got {epochs}")
    if self.batch_size <= 0:
      raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")
    for name in ("epochs", "log_every", "eval_every", "keep_checkpoints", "image_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.eval_image_size is not None and self.eval_image_size < 1:
      raise ValueError(f"eval_image_size must be >= 1 or None, got {self.eval_image_size}")
    if not 0 < self.eval_crop_fraction <= 1:
      raise ValueError(f"eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}")
    if self.bn_recompute_images < 0:
      raise ValueError(f"bn_recompute_images must be >= 0, got {self.bn_recompute_images}")
    if self.steps is not None and self.steps < 1:
      raise ValueError(f"steps must be >= 1 or None, got {self.steps}")
    if not 1 <= self.max_steps_in_flight <= 30:
      raise ValueError(f"max_steps_in_flight must be in [1, 30], got {self.max_steps_in_flight}")
    if (self.mean is None) != (self.std is None):
      raise ValueError("mean and std must both be set or both be None")
    if not (self.trainable in ("all", "head", "backbone") or (isinstance(self.trainable, int) and self.trainable >= 0)):
      raise ValueError(f'trainable must be "all", "head", "backbone" or a number of top stages >= 0, got {self.trainable!r}')
    if self.feature_cache is not None and not isinstance(self.feature_cache, dict):
      raise ValueError(f"feature_cache must be None or a dict of options, got {self.feature_cache!r}")
    from jcv.train.init_from import INIT_STEPS
    unknown = set(self.init_from or {}) - set(INIT_STEPS)
    if unknown:
      raise ValueError(f"unknown init_from step(s) {sorted(unknown)}; expected {sorted(INIT_STEPS)}")
    for i, phase in enumerate(self.phases):
      bad = set(dict(phase)) - self.field_names() | ({"phases"} & set(dict(phase)))
      if bad:
        raise ValueError(f"phase {i}: {sorted(bad)} cannot be set per phase")
      try:
        self.replace(phases=(), **dict(phase)).validate()
      except ValueError as e:
        raise ValueError(f"phase {i}: {e}") from None
    return self


# Lookahead (jcv.train.optim.lookahead): "every" > 0 turns it on, syncing every N steps; the
# slow-weight decay grows as decay * (step / total) ** power.
LOOKAHEAD = {"every": 0, "decay": 0.95 ** 5, "power": 3.0}


def lookahead_options(config: "Config") -> dict:
  """``config.lookahead`` over the defaults (ValueError on an unknown option)."""
  unknown = set(config.lookahead) - set(LOOKAHEAD)
  if unknown:
    raise ValueError(f"lookahead: unknown option(s) {sorted(unknown)}; expected {sorted(LOOKAHEAD)}")
  return {**LOOKAHEAD, **config.lookahead}


# Flat fields of older configs -> (options field, option name); muon's depend on the optimizer.
_LEGACY_SCHEDULE = {"final_lr_fraction": "final_lr_fraction", "step_decay_epochs": "decay_epochs",
                    "step_decay_factor": "decay_factor", "onecycle_pct_start": "pct_start",
                    "onecycle_div_factor": "div_factor", "onecycle_final_div_factor": "final_div_factor"}
_LEGACY_OPTIMIZER = {"momentum": "momentum", "nesterov": "nesterov", "b1": "b1", "b2": "b2", "eps": "eps",
                     "rms_decay": "decay"}
_LEGACY_MUON = {"muon_learning_rate": "learning_rate", "muon_momentum": "momentum", "muon_ns_steps": "ns_steps",
                "muon_normalize_weights": "normalize_weights", "muon_fallback": "fallback"}
_LEGACY_LOOKAHEAD = {"lookahead_every": "every", "lookahead_decay": "decay", "lookahead_power": "power"}
_LEGACY_NAMES = set(_LEGACY_SCHEDULE) | set(_LEGACY_OPTIMIZER) | set(_LEGACY_MUON) | set(_LEGACY_LOOKAHEAD)


def _legacy_value(config: "Config", name: str):
  """The value an older flat field ``name`` has in ``config``'s grouped options."""
  from jcv.train import optim
  if name in _LEGACY_LOOKAHEAD:
    return lookahead_options(config)[_LEGACY_LOOKAHEAD[name]]
  if name in _LEGACY_SCHEDULE:
    key = _LEGACY_SCHEDULE[name]
    options = optim.schedule_options(config) if config.schedule in optim.SCHEDULES else {}
    tables = [options] + [d for d, _ in optim.SCHEDULES.values()]
  elif name in _LEGACY_MUON:
    key = _LEGACY_MUON[name]
    tables = [optim.optimizer_options(config) if config.optimizer == "muon" else optim.OPTIMIZERS["muon"][0]]
  else:
    key = _LEGACY_OPTIMIZER[name]
    options = optim.optimizer_options(config) if config.optimizer in optim.OPTIMIZERS else {}
    if config.optimizer == "muon":
      options = options["fallback_options"] if key != "nesterov" else options
    tables = [options] + [d for d, _ in optim.OPTIMIZERS.values()]
  return next(t[key] for t in tables if key in t)


def _init_with_legacy_names(init):
  """Wraps the dataclass ``__init__`` so ``Config(momentum=0.8)`` (an older flat name) still
  works: the value goes into ``optimizer_options``/``schedule_options``."""
  defaults = types.SimpleNamespace(optimizer="sgd", schedule="cosine", optimizer_options={}, schedule_options={},
                                   lookahead={})

  def __init__(self, **fields):
    init(self, **_from_legacy(defaults, dict(fields)))
  __init__.__doc__ = init.__doc__
  return __init__


Config.__init__ = _init_with_legacy_names(Config.__init__)


def _from_legacy(config: "Config", changes: dict) -> dict:
  """``changes`` with flat optimizer/schedule names of older configs moved into
  ``optimizer_options``/``schedule_options`` (only those the named optimizer/schedule has)."""
  legacy = {k: changes.pop(k) for k in list(changes) if k in _LEGACY_NAMES}
  ahead = {new: legacy.pop(old) for old, new in _LEGACY_LOOKAHEAD.items() if old in legacy}
  if ahead:
    changes["lookahead"] = {**changes.get("lookahead", config.lookahead), **ahead}
  if not legacy:
    return changes
  from jcv.train.optim import OPTIMIZERS, SCHEDULES

  def pick(table, name, renames):
    known = (OPTIMIZERS if table == "optimizer" else SCHEDULES).get(name, ({},))[0]
    return {new: legacy[old] for old, new in renames.items() if old in legacy and new in known}

  optimizer = changes.get("optimizer", config.optimizer)
  schedule = changes.get("schedule", config.schedule)
  same_opt = optimizer == config.optimizer and "optimizer_options" not in changes
  opt = dict(config.optimizer_options if same_opt else changes.get("optimizer_options", {}))
  if optimizer == "muon":
    opt.update({new: legacy[old] for old, new in _LEGACY_MUON.items() if old in legacy})
    if "nesterov" in legacy:
      opt["nesterov"] = legacy["nesterov"]
    fallback = opt.get("fallback", "sgd")
    opt["fallback_options"] = {**opt.get("fallback_options", {}), **pick("optimizer", fallback, _LEGACY_OPTIMIZER)}
  elif optimizer in OPTIMIZERS:
    opt.update(pick("optimizer", optimizer, _LEGACY_OPTIMIZER))
  same_sched = schedule == config.schedule and "schedule_options" not in changes
  sched = dict(config.schedule_options if same_sched else changes.get("schedule_options", {}))
  sched.update(pick("schedule", schedule, _LEGACY_SCHEDULE))
  return {**changes, "optimizer_options": opt, "schedule_options": sched}


def _choice(name, value, allowed):
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


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

