"""Building a run's parts from its Config: sources, model, augmentation, compiled steps.

Everything here is a function of the Config (and, for a source, of the files it names), so
``fit``, ``evaluate`` and the experiment scripts build the same things the same way.
"""
from __future__ import annotations

import functools
import pathlib
import warnings

import jax
import jax.numpy as jnp

from jcv.train import step as step_lib
from jcv.train.config import Config
from jcv.train.optim import muon_mask

__all__ = [
    "enable_compilation_cache", "is_image_folder", "source_spec", "build_source", "build_sources",
    "build_model", "build_augment", "eval_view", "train_config", "train_fn", "eval_fn", "last_phase",
    "checkpoint_optimizer", "trainable_stages",
]


def enable_compilation_cache(config: Config, workdir) -> str | None:
  """Turns on JAX's persistent compilation cache ("auto": the user's cache directory,
  :func:`jcv.perf.compilation_cache_dir`, never next to the workdir)."""
  where = config.compilation_cache
  if not where:
    return None
  if jax.config.jax_compilation_cache_dir:  # already chosen by the user or an earlier run
    return jax.config.jax_compilation_cache_dir
  from jcv import perf
  try:
    return perf.enable_compilation_cache(None if where == "auto" else where, min_compile_time_s=0.5)
  except OSError as e:
    if e.errno is None:  # a folder others can write to: refused, not skipped
      raise
    warnings.warn(f"cannot use the compilation cache {e.filename or where} ({e.strerror}); "
                  "going on without it")
    return None


def is_image_folder(path, split: str = "train") -> bool:
  """Whether ``path`` is an image folder holding ``split`` (``path/<split>/<class>/<file>``)."""
  return bool(path) and (pathlib.Path(path) / split.split("[", 1)[0]).is_dir()


def source_spec(config: Config, split: str):
  """What to hand ``jcv.data.sources.resolve``: ``data_dir`` itself when it is an image
  folder holding ``split`` (``--data-dir ../shared/data/cifar10``), else ``config.dataset``."""
  if config.data_dir:
    if is_image_folder(config.data_dir, split) or (config.val_fraction and is_image_folder(config.data_dir)):
      return config.data_dir
  return config.dataset


def build_source(config: Config, split: str):
  """The jcv.data source of ``split`` (``val`` is carved from train by ``val_fraction``)."""
  from jcv.data import sources
  return sources.resolve(source_spec(config, split), split=split, data_dir=config.data_dir,
                         val_fraction=config.val_fraction, seed=config.seed, **config.source_options)


def build_sources(config: Config, train_source=None, eval_source=None):
  """(train, eval) sources: the given ones, else built from the config (eval: None when
  ``eval_split`` is empty)."""
  train = train_source if train_source is not None else build_source(config, config.train_split)
  if eval_source is None and config.eval_split:
    eval_source = build_source(config, config.eval_split)
  return train, eval_source


def build_model(config: Config, num_classes: int):
  """``jcv.models.create(config.model, ...)`` with the config's dtype and model options."""
  import jcv.models
  options = dict(config.model_options)
  if config.dtype != "float32":
    options["dtype"] = jnp.dtype(config.dtype)
  return jcv.models.create(config.model, num_classes=num_classes, **options)


def build_augment(config: Config, num_classes: int):
  """The on-device augmentation ``fn(key, images_uint8, labels) -> (float [0, 1], soft labels)``."""
  try:
    from jcv.data.augment import make_augment
  except ImportError:
    if config.augment:
      warnings.warn("jcv.data.augment is not available; training without on-device augmentation")
    return None
  return make_augment(list(config.augment), num_classes=num_classes)


def eval_view(config: Config) -> dict:
  """The evaluation view of a run: ``{"image_size", "crop_fraction"}`` for eval loaders."""
  return {"image_size": config.eval_image_size or config.image_size,
          "crop_fraction": config.eval_crop_fraction}


def train_config(config: Config, model) -> Config:
  """``config`` with ``trainable`` turned into what trains it: ``freeze`` patterns,
  ``lr_multipliers`` groups and the model's ``frozen_stages`` options (see
  :func:`jcv.train.transfer.regime_options`); what the config sets itself wins (e.g.
  ``model_options={"frozen_bn_stages": 0}``: BatchNorm in train mode). ``trainable="all"``
  changes nothing."""
  if config.trainable == "all":
    return config
  from jcv.train import transfer
  if config.trainable == "head":
    fields = transfer.regime_options("frozen", stage_names=model.stage_names())
  else:
    fields = transfer.regime_options("finetune", stage_names=model.stage_names(),
                                     trainable_stages=trainable_stages(config, model),
                                     backbone_lr_multiplier=config.backbone_lr_multiplier)
  return config.replace(freeze=tuple(config.freeze) + tuple(fields["freeze"]),
                        lr_multipliers={**fields["lr_multipliers"], **config.lr_multipliers},
                        model_options={**fields["model_options"], **config.model_options})


def trainable_stages(config: Config, model) -> int | None:
  """How many top stages ``config.trainable`` trains: N, the stage count for "backbone", None
  for "all" and 0 for "head"."""
  if config.trainable == "all":
    return None
  if config.trainable == "head":
    return 0
  count = len(model.stage_names())
  return count if config.trainable == "backbone" else int(config.trainable)


def train_fn(config: Config, *, num_classes, augment_fn, schedule, features: bool = False):
  """``train_step`` with the config's options bound (``features=True``: the inputs are cached
  features, not images: no normalisation)."""
  l2 = config.weight_decay if config.weight_decay_mode == "l2" else 0.0
  return functools.partial(
      step_lib.train_step, augment_fn=augment_fn, num_classes=num_classes,
      mean=None if features else config.mean, std=None if features else config.std,
      label_smoothing=config.label_smoothing, l2_weight=l2,
      decay_bn_and_bias=config.decay_bn_and_bias, freeze=tuple(config.freeze), schedule=schedule,
      sync_batch_stats=config.sync_batch_stats,
      l2_exclude=(lambda p: muon_mask(p, config)) if config.optimizer == "muon" else None)


def eval_fn(config: Config, *, features: bool = False):
  """``eval_step`` with the config's normalisation and test-time augmentation bound
  (``features=True``: cached features, used as they are)."""
  if features:
    return step_lib.eval_step
  return functools.partial(step_lib.eval_step, mean=config.mean, std=config.std,
                           tta_flip=config.tta_flip, tta_translate=config.tta_translate)


def last_phase(config: Config) -> Config:
  """The config of the run's last phase (the run itself when it has no ``phases``)."""
  return config.phase_configs()[-1]


def checkpoint_optimizer(config: Config, model):
  """The optimizer whose state a run's final checkpoint holds (its last phase's), for restoring."""
  from jcv.train.optim import make_optimizer
  tx, _ = make_optimizer(train_config(last_phase(config), model), steps_per_epoch=1, total_steps=1)
  return tx
