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
import numpy as np

from jcv.train import durations, parallel, step as step_lib
from jcv.train.config import Config
from jcv.train.optim import make_optimizer, muon_mask

__all__ = [
    "enable_compilation_cache", "is_image_folder", "source_spec", "build_source", "build_sources",
    "build_model", "build_augment", "eval_view", "train_config", "train_fn", "random_batch", "train_mesh", "eval_fn", "last_phase",
    "checkpoint_optimizer", "trainable_stages", "image_loaders", "regime_options", "REGIMES", "stage_options", "example_shape",
    "total_steps", "tta_options", "compute_dtype", "model_options",
]


def enable_compilation_cache(config: Config, workdir) -> str | None:
  """Turns on JAX's persistent compilation cache ("auto": the user's cache directory,
  :func:`jcv.perf.compilation_cache_dir`, never next to the workdir)."""
  where = config.run.compilation_cache
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
  folder holding ``split`` (``--data-dir ../shared/data/cifar10``), else ``config.data.dataset``."""
  if config.data.data_dir:
    if is_image_folder(config.data.data_dir, split) or (config.data.val_fraction and is_image_folder(config.data.data_dir)):
      return config.data.data_dir
  return config.data.dataset


def build_source(config: Config, split: str):
  """The jcv.data source of ``split`` (``val`` is carved from train by ``val_fraction``)."""
  from jcv.data import sources
  return sources.resolve(source_spec(config, split), split=split, data_dir=config.data.data_dir,
                         val_fraction=config.data.val_fraction, seed=config.run.seed, cache=config.data.cache,
                         strict=config.data.strict, max_pixels=config.data.max_pixels)


def build_sources(config: Config, train_source=None, eval_source=None):
  """(train, eval) sources: the given ones, else built from the config (eval: None when
  ``eval_split`` is empty)."""
  train = train_source if train_source is not None else build_source(config, config.data.train_split)
  if eval_source is None and config.data.eval_split:
    eval_source = build_source(config, config.data.eval_split)
  return train, eval_source


def image_loaders(config: Config, train_src, eval_src) -> dict:
  """{"train_ld", "eval_ld", "input_shape"}: the image pipelines of a run (per-process batches)."""
  from jcv.data import pipeline
  pcount, d = jax.process_count(), config.data
  if d.batch_size % jax.device_count():
    raise ValueError(f"data.batch_size {d.batch_size} must be divisible by the {jax.device_count()} devices")
  train_ld = pipeline.train_loader(train_src, batch_size=d.batch_size // pcount, image_size=d.image_size,
                                   seed=config.run.seed, crop=d.crop, scale=tuple(d.crop_scale),
                                   flip={"none": False, "random": True}.get(d.host_flip, d.host_flip),
                                   num_workers=d.num_workers)
  eval_bs = (config.evaluation.batch_size or d.batch_size) // pcount
  eval_ld = (pipeline.eval_loader(eval_src, batch_size=eval_bs, num_workers=d.num_workers, **eval_view(config))
             if eval_src is not None else None)
  return {"train_ld": train_ld, "eval_ld": eval_ld, "input_shape": example_shape(config)}


def compute_dtype(config: Config) -> str:
  """The model's compute dtype: ``model.dtype``, with "auto" resolved on this machine
  (bfloat16 where :func:`jcv.perf.bfloat16_is_fast`, else float32)."""
  if config.model.dtype != "auto":
    return config.model.dtype
  from jcv import perf
  return "bfloat16" if perf.bfloat16_is_fast() else "float32"


def model_options(config: Config) -> dict:
  """The keyword options of ``jcv.models.create`` for the config: ``model.options`` and the dtype."""
  options = dict(config.model.options)
  dtype = compute_dtype(config)
  if dtype != "float32":
    options["dtype"] = jnp.dtype(dtype)
  return options


def build_model(config: Config, num_classes: int):
  """``jcv.models.create(config.model.name, ...)`` with the config's dtype and model options."""
  import jcv.models
  return jcv.models.create(config.model.name, num_classes=num_classes, **model_options(config))


def build_augment(config: Config, num_classes: int):
  """The on-device augmentation ``fn(key, images_uint8, labels) -> (float [0, 1], soft labels)``."""
  try:
    from jcv.data.augment import make_augment
  except ImportError:
    if config.augment.ops:
      warnings.warn("jcv.data.augment is not available; training without on-device augmentation")
    return None
  return make_augment(list(config.augment.ops), num_classes=num_classes)


def eval_view(config: Config) -> dict:
  """The evaluation view of a run: ``{"image_size", "crop_fraction"}`` for eval loaders."""
  return {"image_size": config.evaluation.image_size or config.data.image_size,
          "crop_fraction": config.evaluation.crop_fraction}


REGIMES = ("scratch", "frozen", "finetune")
NOT_HEAD = "^(?!head/)"  # every parameter path outside the classifier head


def regime_options(regime: str, *, stage_names: list[str], trainable_stages: int | None = None,
                   backbone_lr_multiplier: float = 0.1, train_bn: bool = False) -> dict:
  """What trains a regime of a staged model: ``{"freeze", "lr_multipliers", "model_options"}``.

  ``scratch``: everything; ``frozen``: the head alone (the backbone's BatchNorm in inference
  mode, no backward pass through it); ``finetune``: the top ``trainable_stages`` (None: all)
  at ``backbone_lr_multiplier`` times the rate, BatchNorm in inference mode unless ``train_bn``.
  """
  count = len(stage_names)
  if regime == "scratch":
    return {"freeze": (), "lr_multipliers": {}, "model_options": {}}
  if regime == "frozen":
    return {"freeze": (NOT_HEAD,), "lr_multipliers": {}, "model_options": {"frozen_stages": count}}
  if regime != "finetune":
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
  trainable = count if trainable_stages is None else int(trainable_stages)
  if not 0 <= trainable <= count:
    raise ValueError(f"trainable_stages must be in [0, {count}], got {trainable_stages}")
  frozen = count - trainable
  freeze = ("^(" + "|".join(stage_names[:frozen]) + ")/",) if frozen else ()
  options = {"frozen_stages": frozen, "frozen_bn_stages": 0 if train_bn else count}
  return {"freeze": freeze, "lr_multipliers": {NOT_HEAD: backbone_lr_multiplier}, "model_options": options}


def train_config(config: Config, model) -> Config:
  """``config`` with ``init.trainable`` turned into what trains it: ``optim.freeze`` patterns,
  ``optim.lr_multipliers`` groups and the model's ``frozen_stages`` options (:func:`regime_options`);
  what the config sets itself wins (e.g. ``model.options={"frozen_bn_stages": 0}``: BatchNorm in
  train mode). ``trainable="all"`` changes nothing."""
  if config.init.trainable == "all":
    return config
  if config.init.trainable == "head":
    fields = regime_options("frozen", stage_names=model.stage_names())
  else:
    fields = regime_options("finetune", stage_names=model.stage_names(),
                           trainable_stages=trainable_stages(config, model),
                           backbone_lr_multiplier=config.init.backbone_lr_multiplier)
  return config.replace(
      optim={"freeze": tuple(config.optim.freeze) + tuple(fields["freeze"]),
             "lr_multipliers": {**fields["lr_multipliers"], **config.optim.lr_multipliers}},
      model={"options": {**fields["model_options"], **config.model.options}})


def stage_options(config: Config) -> dict:
  """The model options of ``config`` that freeze stages (``frozen_stages``, ``frozen_bn_stages``)."""
  return {k: v for k, v in config.model.options.items() if k in ("frozen_stages", "frozen_bn_stages")}


def example_shape(config: Config) -> tuple[int, int, int]:
  """One training image's shape, NHWC without the batch: ``(size, size, 3)``."""
  return (config.data.image_size, config.data.image_size, 3)


def trainable_stages(config: Config, model) -> int | None:
  """How many top stages ``config.init.trainable`` trains: N, the stage count for "backbone", None
  for "all" and 0 for "head"."""
  if config.init.trainable == "all":
    return None
  if config.init.trainable == "head":
    return 0
  count = len(model.stage_names())
  return count if config.init.trainable == "backbone" else int(config.init.trainable)


def train_fn(config: Config, *, num_classes, augment_fn, schedule, features: bool = False):
  """``train_step`` with the config's options bound (``features=True``: the inputs are cached
  features, not images: no normalisation)."""
  l2 = config.optim.weight_decay if config.optim.weight_decay_mode == "l2" else 0.0
  return functools.partial(
      step_lib.train_step, augment_fn=augment_fn, num_classes=num_classes,
      mean=None if features else config.data.mean, std=None if features else config.data.std,
      label_smoothing=config.augment.label_smoothing, l2_weight=l2,
      decay_bn_and_bias=config.optim.decay_bn_and_bias, freeze=tuple(config.optim.freeze), schedule=schedule,
      sync_batch_stats=config.run.sync_batch_stats,
      l2_exclude=(lambda p: muon_mask(p, config.optim)) if config.optim.muon is not None else None)


def random_batch(batch_size: int, shape, num_classes: int) -> dict:
  """A seeded batch of random uint8 images of ``shape`` (HWC) and labels, for timing a step."""
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (batch_size, *shape), dtype=np.uint8),
          "label": rng.integers(0, num_classes, batch_size).astype(np.int32)}


def train_mesh(config: Config, train_step_fn, state, *, input_shape, num_classes: int, features: bool = False):
  """The mesh a run trains on (``run.devices``; "auto" times ``train_step_fn``, a :func:`train_fn`,
  on a random batch: :func:`jcv.train.parallel.train_devices`); cached features train on every device."""
  if features or config.run.devices == "all":
    return parallel.make_mesh()
  batch = random_batch(config.data.batch_size, tuple(input_shape), num_classes)
  return parallel.make_mesh(parallel.train_devices(config.run.devices, train_step_fn, state, batch,
                                                   mode=config.run.parallel))


def eval_fn(config: Config, *, features: bool = False):
  """``eval_step`` with the config's normalisation and test-time augmentation bound
  (``features=True``: cached features, used as they are)."""
  if features:
    return step_lib.eval_step
  return functools.partial(step_lib.eval_step, **tta_options(config))


def tta_options(config: Config) -> dict:
  """The normalisation and test-time augmentation of ``step.predict_logits`` for ``config``."""
  e = config.evaluation
  return {"mean": config.data.mean, "std": config.data.std, "tta_flip": e.tta_flip,
          "tta_translate": e.tta_translate, "tta_multicrop": e.tta_multicrop}


def last_phase(config: Config) -> Config:
  """The config of the run's last phase (the run itself when it has no ``phases``)."""
  return config.phase_configs()[-1]


def total_steps(config: Config, steps_per_epoch: int) -> int:
  """How many optimizer steps ``config.run.length`` lasts with ``steps_per_epoch``."""
  return durations.steps(config.run.length, steps_per_epoch=steps_per_epoch, batch_size=config.data.batch_size)


def checkpoint_optimizer(config: Config, model):
  """The optimizer whose state a run's final checkpoint holds (its last phase's), for restoring."""
  tx, _ = make_optimizer(train_config(last_phase(config), model), steps_per_epoch=1, total_steps=1)
  return tx
