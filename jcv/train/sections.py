"""The sections of a run's :class:`jcv.train.config.Config`: frozen dataclasses grouped by
concern, each validating itself (optimizer and schedule names against jcv.train.optim's tables).

Lengths are durations (``"8 epochs"``, ``"200 steps"``, ``"10000 examples"``; jcv.train.durations).
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Union

from jcv.train import durations, optim

__all__ = ["Mean", "Trainable", "Data", "Augment", "Model", "Pretrained", "Whiten", "FeatureCache", "Init",
           "Muon", "Lookahead", "Optim", "Plateau", "Schedule", "EarlyStopping", "Evaluation", "Run", "Phase",
           "choice"]

Mean = Union[tuple[float, ...], Literal["pretrained"], None]  # on [0, 1] images, per channel
Trainable = Union[Literal["all", "head", "backbone"], int]    # int N: the top N stages + head
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def choice(name, value, allowed):
  """ValueError naming ``name`` unless ``value`` is one of ``allowed``."""
  if value not in allowed:
    raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _at_least(section, names, low):
  for name in names:
    value = getattr(section, name)
    if value is not None and value < low:
      raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclasses.dataclass(frozen=True)
class Data:
  """What trains and evaluates, and how the host turns files into uint8 batches."""
  dataset: str = "cifar10"            # tfds name or image-folder path (jcv.data.sources.resolve)
  data_dir: str | None = None         # tfds data_dir, or an image folder holding the splits
  train_split: str = "train"
  eval_split: str = "test"            # "" disables evaluation
  val_fraction: float | None = None   # carve a validation split from train (image folders)
  cache: bool | str = "auto"          # image folders: decode small datasets once into a .npy cache
  strict: bool = False                # image folders: a corrupt file stops the run (else skipped, counted)
  max_pixels: int | None = None       # image folders: larger images are refused
  image_size: int = 32                # training input size (pixels, square)
  crop: str = "none"                  # host crop: random_resized | pad_crop | none (resize + centre crop)
  crop_scale: tuple[float, float] = (0.08, 1.0)  # random_resized: range of the crop's area fraction
  host_flip: str = "none"             # none | random | alternate (airbench: mirrored every other epoch)
  num_workers: int = 0                # grain worker processes (0 = in-process)
  batch_size: int = 128               # global batch (all devices of all processes)
  mean: Mean = CIFAR10_MEAN           # normalisation; "pretrained": the weights' own; None: none
  std: Mean = CIFAR10_STD

  def validate(self):
    choice("data.crop", self.crop, ("none", "random_resized", "pad_crop"))
    choice("data.host_flip", self.host_flip, ("none", "random", "alternate"))
    _at_least(self, ("batch_size", "max_pixels"), 1)
    _at_least(self, ("num_workers",), 0)
    if self.image_size < 8:
      raise ValueError(f"data.image_size must be >= 8 pixels, got {self.image_size}")
    if self.val_fraction is not None and not 0 < self.val_fraction < 1:
      raise ValueError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
    if not (len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1):
      raise ValueError(f"data.crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale}")
    if (self.mean is None) != (self.std is None):
      raise ValueError("data.mean and data.std must both be set or both be None")
    for name in ("mean", "std"):
      value = getattr(self, name)
      if value is None or value == "pretrained":
        continue
      if isinstance(value, str) or len(value) not in (1, 3) or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f'data.{name} must be 3 numbers (one per channel), "pretrained" or None, got {value!r}')
      if name == "std" and not all(v > 0 for v in value):
        raise ValueError(f"data.std must be > 0 per channel, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Augment:
  """What the compiled train step does to images and labels before the model sees them."""
  ops: tuple = ("flip", ("pad_crop", {"padding": 4}))  # jcv.data.augment.make_augment's list
  label_smoothing: float = 0.0

  def validate(self):
    from jcv.data.augment import make_augment
    for op in self.ops:
      name = op if isinstance(op, str) else op[0]
      if name in ("normalize", "label_smoothing"):
        where = "data.mean/std" if name == "normalize" else "augment.label_smoothing"
        raise ValueError(f"augment op {name!r}: set {where} instead (one place for each)")
    try:
      make_augment(list(self.ops), num_classes=2)  # unknown ops and options, values out of range
    except (ValueError, TypeError) as e:
      raise ValueError(f"augment.ops: {e}") from None
    if not 0 <= self.label_smoothing < 1:
      raise ValueError(f"augment.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclasses.dataclass(frozen=True)
class Model:
  """The network: a registered family (``jcv.models.list_models()``) and its keyword options."""
  name: str = "resnet20"
  options: dict = dataclasses.field(default_factory=dict)  # keyword arguments of the family (width, ...)
  num_classes: int | None = None      # None: the number of classes of the training source
  dtype: str = "float32"              # compute dtype: float32 | bfloat16 | float16 | auto (params stay float32)
  # auto: bfloat16 where jcv.perf.bfloat16_is_fast() (an accelerator, or a CPU with AVX512_BF16/AMX), else float32

  def validate(self):
    choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
    _at_least(self, ("num_classes",), 2)


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Pretrained weights ported into the model (jcv.weights): a file or a download name."""
  weights: str | None = None
  head: str | None = None             # a classifier-head file of the same weights, if any


@dataclasses.dataclass(frozen=True)
class Whiten:
  """The ``whiten`` layer's kernel from the first ``num_images`` training images (airbench)."""
  num_images: int = 5000
  eps: float = 5e-4


@dataclasses.dataclass(frozen=True)
class FeatureCache:
  """A frozen bottom's features computed once (jcv.train.features) and trained on."""
  flip: bool = True                   # also cache each image's mirror image
  crop_views: int = 0                 # extra random crops cached per image
  stage: int | None = None            # cache lower than needed (negative: from the top), to share it
  directory: str | None = None        # default: WORKDIR/features


@dataclasses.dataclass(frozen=True)
class Init:
  """Where the weights start and which of them train (transfer learning)."""
  pretrained: Pretrained | None = None  # ImageNet weights (then whiten, if both are set)
  whiten: Whiten | None = None
  trainable: Trainable = "all"        # "all" | "head" | N top stages + head | "backbone" (BN frozen)
  backbone_lr_multiplier: float = 1.0  # trainable N / "backbone": the backbone's rate factor
  feature_cache: FeatureCache | None = None  # trainable "head"/N: train on cached features

  def validate(self):
    t = self.trainable
    if not (t in ("all", "head", "backbone") or (isinstance(t, int) and not isinstance(t, bool) and t >= 0)):
      raise ValueError(f'init.trainable must be "all", "head", "backbone" or a number of top stages >= 0, got {t!r}')
    if self.pretrained is not None and not self.pretrained.weights:
      raise ValueError("init.pretrained.weights: name a weights file or download name")
    if self.whiten is not None and self.whiten.num_images < 1:
      raise ValueError(f"init.whiten.num_images must be >= 1, got {self.whiten.num_images}")
    if self.backbone_lr_multiplier < 0:
      raise ValueError(f"init.backbone_lr_multiplier must be >= 0, got {self.backbone_lr_multiplier}")


@dataclasses.dataclass(frozen=True)
class Muon:
  """Muon (orthogonalised momentum) for the convolution kernels; ``Optim.name`` trains the rest."""
  learning_rate: float = 0.02
  momentum: float = 0.95
  nesterov: bool = True
  ns_steps: int = 5
  normalize_weights: bool = False     # renormalise each kernel after its update (airbench94_muon)


@dataclasses.dataclass(frozen=True)
class Lookahead:
  """airbench's lookahead: slow weights synced every ``every`` steps, decay growing to the end."""
  every: int = 5
  decay: float = 0.95 ** 5
  power: float = 3.0


@dataclasses.dataclass(frozen=True)
class Optim:
  """The optimizer, its options, weight decay and parameter groups (jcv.train.optim)."""
  name: str = "sgd"                   # sgd | adamw | rmsprop | lamb (optim.OPTIMIZERS)
  learning_rate: float = 0.1          # peak learning rate
  momentum: float = 0.9               # sgd, rmsprop
  nesterov: bool = True               # sgd, rmsprop
  b1: float = 0.9                     # adamw, lamb
  b2: float = 0.999                   # adamw, lamb
  eps: float = 1e-8                   # adamw, lamb, rmsprop
  rms_decay: float = 0.9              # rmsprop
  weight_decay: float = 5e-4
  weight_decay_mode: str = "decoupled"  # decoupled (lr-scaled) | l2 (lambda/2 ||w||^2 in the loss)
  decay_bn_and_bias: bool = False     # False: no decay on BN scales, biases
  grad_clip_norm: float | None = None
  muon: Muon | None = None            # set: Muon trains the conv kernels
  lookahead: Lookahead | None = None
  freeze: tuple[str, ...] = ()        # regexes on "/"-joined param paths: not trained, BN stats kept
  lr_multipliers: dict = dataclasses.field(default_factory=dict)  # regex -> rate factor
  group_lengths: dict = dataclasses.field(default_factory=dict)   # lr_multipliers regex -> duration of its whole schedule

  def validate(self):
    optim.check_optimizer(self)
    choice("optim.weight_decay_mode", self.weight_decay_mode, ("decoupled", "l2"))
    _at_least(self, ("learning_rate", "weight_decay"), 0)
    if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
      raise ValueError(f"optim.grad_clip_norm must be > 0 or None, got {self.grad_clip_norm}")
    if self.lookahead is not None and self.lookahead.every < 1:
      raise ValueError(f"optim.lookahead.every must be >= 1, got {self.lookahead.every}")
    for pattern, length in self.group_lengths.items():
      if pattern not in self.lr_multipliers:
        raise ValueError(f"optim.group_lengths pattern {pattern!r} must also be an optim.lr_multipliers key "
                         "(use 1.0 to keep the rate)")
      durations.check(f"optim.group_lengths[{pattern!r}]", length)


@dataclasses.dataclass(frozen=True)
class Plateau:
  """The rate times ``factor`` when ``evaluation.best_metric`` has not improved (by more than
  ``min_delta``) for ``patience`` evaluations; then ``cooldown`` evaluations without a cut."""
  factor: float = 0.1
  patience: int = 2
  min_delta: float = 0.0
  cooldown: int = 0
  min_scale: float = 1e-3             # the rate never drops below this fraction of the schedule's

  def validate(self):
    if not 0 < self.factor < 1:
      raise ValueError(f"schedule.plateau.factor must be in (0, 1), got {self.factor}")
    _at_least(self, ("patience",), 1)
    _at_least(self, ("cooldown", "min_delta", "min_scale"), 0)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The learning-rate schedule (optim.SCHEDULES) and its options."""
  name: str = "cosine"                # cosine | onecycle | triangle | linear | step | constant
  warmup: str = "0 epochs"            # linear warmup from 0 (cosine, linear, step, constant)
  final_lr_fraction: float = 0.0      # cosine, linear: the final rate as a fraction of the peak
  pct_start: float = 0.25             # onecycle, triangle
  div_factor: float = 25.0            # onecycle, triangle
  final_div_factor: float = 1e4       # onecycle, triangle
  decay_at: tuple[str, ...] = ()      # step: durations at which the rate is multiplied by decay_factor
  decay_factor: float = 0.1           # step
  plateau: Plateau | None = None      # also cut the rate when the validation metric stalls (Keras' ReduceLROnPlateau)

  def validate(self):
    optim.check_schedule(self)
    if self.plateau is not None:
      self.plateau.validate()
    durations.check("schedule.warmup", self.warmup, positive=False)
    for at in self.decay_at:
      durations.check("schedule.decay_at", at)


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stop when ``evaluation.best_metric`` has not improved by more than ``min_delta`` for
  ``patience`` evaluations; ``restore_best``: the run ends on its best checkpoint's weights."""
  patience: int = 3
  min_delta: float = 0.0
  restore_best: bool = True

  def validate(self):
    _at_least(self, ("patience",), 1)
    _at_least(self, ("min_delta",), 0)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """How and when the model is evaluated, and which checkpoint counts as best."""
  every: str = "1 epochs"             # also at the end of training
  batch_size: int | None = None       # default: data.batch_size
  image_size: int | None = None       # eval/predict input size (None: data.image_size; larger: FixRes)
  crop_fraction: float = 0.875        # shorter side to size / this, centre crop (1.0: whole image)
  tta_flip: bool = False              # average logits with the mirrored image
  tta_translate: int = 0              # > 0: also views shifted by this many pixels (airbench)
  tta_multicrop: int | None = None    # crop size: the mean over 4 corner + centre crops of the eval view
  best_metric: str = "top1"           # ranks checkpoints (higher is better; "loss": lower)
  bn_recompute: str | None = None     # e.g. "10000 examples": BN statistics re-averaged at the end
  early_stopping: EarlyStopping | None = None

  def validate(self):
    if self.early_stopping is not None:
      self.early_stopping.validate()
    durations.check("evaluation.every", self.every)
    durations.check("evaluation.bn_recompute", self.bn_recompute, allow_none=True)
    choice("evaluation.best_metric", self.best_metric, ("top1", "top5", "loss"))
    _at_least(self, ("batch_size",), 1)
    _at_least(self, ("image_size",), 8)
    _at_least(self, ("tta_translate",), 0)
    _at_least(self, ("tta_multicrop",), 8)
    if self.tta_multicrop and self.tta_translate:
      raise ValueError("evaluation.tta_multicrop and evaluation.tta_translate are two kinds of views: choose one")
    if not 0 < self.crop_fraction <= 1:
      raise ValueError(f"evaluation.crop_fraction must be in (0, 1], got {self.crop_fraction}")


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase of a run (``Run.phases``): its length and what it changes (None: inherited)."""
  length: str = "1 epochs"
  trainable: Trainable | None = None
  learning_rate: float | None = None
  backbone_lr_multiplier: float | None = None
  warmup: str | None = None

  def validate(self):
    durations.check("phase length", self.length)
    durations.check("phase warmup", self.warmup, positive=False, allow_none=True)


@dataclasses.dataclass(frozen=True)
class Run:
  """How long the run trains (or its phases), and how it runs: seed, parallelism, checkpoints, logs."""
  length: str = "10 epochs"           # with phases: a budget the phases spend in order
  phases: tuple[Phase, ...] = ()      # trained in order, each from the previous one's weights
  seed: int = 0
  parallel: str = "jit"               # jit (Mesh + NamedSharding) | pmap (shard_map, explicit pmean)
  devices: str | int = "all"          # all | N (the first N) | auto (CPU: the faster of all and one, timed)
  sync_batch_stats: bool = True       # pmap: BatchNorm over the global batch (False: per device)
  max_steps_in_flight: int = 16       # block on results at least this often (<= 30)
  checkpoint_every: str | None = None  # also at every epoch end and evaluation
  keep_checkpoints: int = 2           # last k kept, plus the best by evaluation.best_metric
  log_every: str = "50 steps"
  compilation_cache: str | None = "auto"  # "auto": ~/.cache/jcv/jax (jcv.perf); None disables
  plots: bool = True
  progress: bool = True

  def __post_init__(self):
    names = [f.name for f in dataclasses.fields(Phase)]
    for p in self.phases:
      unknown = sorted(set(p) - set(names)) if isinstance(p, dict) else ()
      if unknown:
        raise ValueError(f"run.phases: unknown field {unknown[0]!r}; fields: {', '.join(names)}")
    object.__setattr__(self, "phases", tuple(p if isinstance(p, Phase) else Phase(**p) for p in self.phases))

  def validate(self):
    durations.check("run.length", self.length)
    durations.check("run.checkpoint_every", self.checkpoint_every, allow_none=True)
    durations.check("run.log_every", self.log_every)
    choice("run.parallel", self.parallel, ("jit", "pmap"))
    if isinstance(self.devices, str):
      choice("run.devices", self.devices, ("all", "auto"))
    elif self.devices < 1:
      raise ValueError(f"run.devices must be 'all', 'auto' or a count >= 1, got {self.devices}")
    _at_least(self, ("keep_checkpoints",), 1)
    if not 1 <= self.max_steps_in_flight <= 30:
      raise ValueError(f"run.max_steps_in_flight must be in [1, 30], got {self.max_steps_in_flight}")


