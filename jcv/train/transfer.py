"""Transfer learning: the three regimes, pretrained initial variables and feature caching.

Regimes (as the course's notebook 3_2), for a staged model such as ``mobilenet_v2``
(``model.stage_names()``: ``stem, block_0 .. block_16, last_conv``, then the ``head``):

- ``scratch``: every parameter trains from a random init.
- ``frozen``: only the new head trains. The backbone's parameters are labelled frozen
  (``optax.set_to_zero`` through ``Config.freeze``), its BatchNorm runs in inference mode and
  no backward pass goes through it (model option ``frozen_stages``).
- ``finetune``: the top ``trainable_stages`` stages (all by default) train with the backbone
  learning rate scaled by ``backbone_lr_multiplier`` (``Config.lr_multipliers`` ->
  ``optax.partition``); the rest stays frozen. BatchNorm stays in inference mode unless
  ``train_bn=True`` (the TF tutorial's advice for small data sets).

Feature caching: when the bottom stages are frozen and no augmentation touches them, their
output is computed once (:func:`compute_features`) and only the top is trained on the cached
arrays (:func:`fit_cached`), with the same pure ``train_step``/``eval_step`` as
:func:`jcv.train.fit`. A horizontal flip can still be used: it is cached as a second view.
"""
from __future__ import annotations

import functools
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jcv.train import step as step_lib
from jcv.train.config import Config
from jcv.train.optim import make_optimizer
from jcv.train.state import TrainState, raw_key

__all__ = [
    "REGIMES", "PretrainedModel", "cache_features", "cached_transfer", "compute_features", "evaluate_cached", "fit_cached",
    "merge_variables", "pool_cached", "predict_cached", "regime_options", "save_run", "split_epochs", "split_model",
    "split_steps", "top_variables", "transfer_config",
]

REGIMES = ("scratch", "frozen", "finetune")
_NOT_HEAD = "^(?!head/)"  # every parameter path outside the classifier head


def regime_options(regime: str, *, stage_names: list[str], trainable_stages: int | None = None,
                   backbone_lr_multiplier: float = 0.1, train_bn: bool = False) -> dict:
  """``Config`` fields (``freeze``, ``lr_multipliers``, ``model_options``) for a regime.

  ``stage_names`` comes from ``model.stage_names()``; ``trainable_stages`` (finetune only)
  counts from the top, ``None`` meaning all of them.
  """
  count = len(stage_names)
  if regime == "scratch":
    return {"freeze": (), "lr_multipliers": {}, "model_options": {}}
  if regime == "frozen":
    return {"freeze": (_NOT_HEAD,), "lr_multipliers": {},
            "model_options": {"frozen_stages": count}}
  if regime != "finetune":
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
  trainable = count if trainable_stages is None else int(trainable_stages)
  if not 0 <= trainable <= count:
    raise ValueError(f"trainable_stages must be in [0, {count}], got {trainable_stages}")
  frozen = count - trainable
  freeze = ("^(" + "|".join(stage_names[:frozen]) + ")/",) if frozen else ()
  options = {"frozen_stages": frozen, "frozen_bn_stages": 0 if train_bn else count}
  return {"freeze": freeze, "lr_multipliers": {_NOT_HEAD: backbone_lr_multiplier},
          "model_options": options}


def transfer_config(config: Config, regime: str, *, stage_names: list[str], **options) -> Config:
  """``config`` with the regime's freezing, learning-rate groups and model options merged in."""
  fields = regime_options(regime, stage_names=stage_names, **options)
  return config.replace(freeze=fields["freeze"], lr_multipliers=fields["lr_multipliers"],
                        model_options={**config.model_options, **fields["model_options"]})


class PretrainedModel:
  """A Flax module whose ``init`` returns given (pretrained) variables.

  Pass it as ``jcv.train.fit(config, model=PretrainedModel(module, variables), ...)``: the
  run starts from ``variables``; ``apply`` and every attribute are the module's, so
  checkpoints, ``evaluate`` and ``predict`` see the plain module (rebuilt from the config).
  """

  def __init__(self, module, variables):
    self.module = module
    self.variables = jax.tree.map(jnp.asarray, dict(variables))

  def init(self, rngs, *args, **kwargs):
    """Ignores its arguments and returns the pretrained variables."""
    del rngs, args, kwargs
    return self.variables

  def apply(self, *args, **kwargs):
    """The wrapped module's ``apply``."""
    return self.module.apply(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self.module, name)


def split_model(model, stage: int):
  """(bottom, top) modules: stages ``[0, stage)`` and ``[stage, ...)`` + head of a staged model.

  ``stage == len(model.stage_names())`` puts the whole backbone in ``bottom``, which then
  returns pooled features. Parameter names are unchanged, so variables split and merge by
  top-level name.
  """
  count = len(model.stage_names())
  if not 0 < stage <= count:
    raise ValueError(f"stage must be in [1, {count}], got {stage}")
  if stage == count:
    bottom = model.clone(num_classes=0, start_stage=0, end_stage=None, frozen_stages=0)
  else:
    bottom = model.clone(start_stage=0, end_stage=stage, frozen_stages=0)
  top = model.clone(start_stage=stage, end_stage=None, frozen_stages=0)
  return bottom, top


def _subtree(variables, names):
  return {col: {k: v for k, v in tree.items() if k in names} for col, tree in variables.items()}


def merge_variables(variables, *parts):
  """``variables`` with the top-level entries of every collection replaced by those in ``parts``."""
  out = {col: dict(tree) for col, tree in variables.items()}
  for part in parts:
    for col, tree in part.items():
      out.setdefault(col, {}).update(tree)
  return out


def compute_features(apply_fn, variables, batches: Iterable[dict], *, mean=None, std=None,
                     flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Runs ``apply_fn(variables, x)`` over eval-style batches once -> (features, labels).

  ``batches`` yield {"image": uint8 NHWC, "label", optional "mask"}; masked-out padding is
  dropped. ``flip=True`` appends the horizontally flipped images as a second view (features
  [2N, ...], labels repeated).
  """
  @jax.jit
  def run(images):
    x = step_lib.to_model_input(images, mean=mean, std=std)
    out = apply_fn(variables, x)
    return (out, apply_fn(variables, x[:, :, ::-1, :])) if flip else (out,)

  views, labels = ([], []), []
  for batch in batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
    for i, out in enumerate(run(jnp.asarray(batch["image"]))):
      views[i].append(np.asarray(out)[keep])
    labels.append(np.asarray(batch["label"])[keep])
  features = np.concatenate(views[0] + views[1]) if flip else np.concatenate(views[0])
  labels = np.concatenate(labels)
  return features, (np.concatenate([labels, labels]) if flip else labels)


def _evaluate(eval_fn, state, features, labels, batch_size):
  sums = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
  for start in range(0, len(labels), batch_size):
    x, y = features[start:start + batch_size], labels[start:start + batch_size]
    pad = batch_size - len(y)  # one shape for every batch: pad and mask out
    mask = np.concatenate([np.ones(len(y), bool), np.zeros(pad, bool)])
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros(pad, y.dtype)])
    out = eval_fn(state, {"image": x, "label": y, "mask": mask})
    for k in sums:
      sums[k] += float(out[k])
  n = max(sums.pop("count"), 1.0)
  return {k: v / n for k, v in sums.items()}


def fit_cached(key, top_model, top_variables: dict, train: tuple, *, config: Config,
               validation: tuple | None = None, log=print) -> tuple[TrainState, list[dict]]:
  """Trains ``top_model`` on cached features with the pure ``train_step`` -> (state, history).

  ``train``/``validation`` are ``(features, labels)``; ``config`` gives the optimizer,
  schedule, freezing, epochs, batch size and label smoothing. ``history`` has one record
  per epoch: train loss/top1, validation loss/top1/top5 and wall time.
  """
  features, labels = train
  batch_size = min(config.batch_size, len(labels))
  steps_per_epoch = len(labels) // batch_size
  total = config.steps or config.epochs * steps_per_epoch
  tx, schedule = make_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total)
  top_variables = jax.tree.map(jnp.array, top_variables)  # copies: the step donates its state
  params = top_variables["params"]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=top_variables.get("batch_stats", {}), opt_state=tx.init(params),
                     key=raw_key(key), apply_fn=top_model.apply, tx=tx)
  num_classes = int(config.num_classes or labels.max() + 1)
  l2 = config.weight_decay if config.weight_decay_mode == "l2" else 0.0
  train_fn = jax.jit(functools.partial(
      step_lib.train_step, num_classes=num_classes, label_smoothing=config.label_smoothing,
      l2_weight=l2, decay_bn_and_bias=config.decay_bn_and_bias, freeze=tuple(config.freeze),
      schedule=schedule), donate_argnums=0)
  eval_fn = jax.jit(step_lib.eval_step)
  rng = np.random.default_rng(config.seed)
  history, started, step = [], time.time(), 0
  epoch = 0
  while step < total:
    order = rng.permutation(len(labels))
    losses, accs = [], []
    for b in range(steps_per_epoch):
      if step >= total:
        break
      idx = order[b * batch_size:(b + 1) * batch_size]
      state, metrics = train_fn(state, {"image": features[idx], "label": labels[idx]})
      losses.append(metrics["loss"])
      accs.append(metrics["top1"])
      step += 1
    epoch += 1
    record = {"epoch": epoch, "step": step, "train_loss": float(np.mean(losses)),
              "train_top1": float(np.mean(accs))}
    if validation is not None:
      val = _evaluate(eval_fn, state, *validation, batch_size)
      record.update({f"val_{k}": v for k, v in val.items()})
    record["wall_s"] = time.time() - started
    history.append(record)
    if log is not None:
      log(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
  return state, history


def evaluate_cached(state: TrainState, features, labels, *, batch_size: int = 256) -> dict:
  """Loss/top-1/top-5 of a :func:`fit_cached` state on cached features."""
  return _evaluate(jax.jit(step_lib.eval_step), state, features, labels, batch_size)


def predict_cached(state: TrainState, features, *, batch_size: int = 256) -> np.ndarray:
  """Logits [N, C] of a :func:`fit_cached` state on cached features."""
  fn = jax.jit(lambda s, x: s.apply_fn(s.variables, x, train=False))
  return np.concatenate([np.asarray(fn(state, features[i:i + batch_size]))
                         for i in range(0, len(features), batch_size)])


def top_variables(variables: dict, model, stage: int) -> dict:
  """The part of ``variables`` that the top of :func:`split_model` (``stage``) uses."""
  names = set(model.stage_names()[stage:]) | {"head"}
  return _subtree(variables, names)




def cache_features(model, variables: dict, sources: dict, *, stage: int, image_size: int,
                   mean=None, std=None, flip: bool = True, crop_views: int = 0,
                   batch_size: int = 64, directory=None, log=print) -> dict:
  """Runs the bottom ``stage`` stages of ``model`` once over every source -> {split: (x, y)}.

  Images get the eval transform (resize, centre crop to ``image_size``); ``flip`` adds the
  mirrored images of the "train" split as a second view; ``crop_views=K`` adds K more views
  of it made by the training transform (random-resized crop, scale 0.25-1, and flip), an
  offline stand-in for augmentation. With ``directory``, each split is
  also saved there as ``<split>.npz`` and loaded from it next time (same stage/size/flip and
  example count; delete the folder after changing weights or data).
  """
  import pathlib
  from jcv.data import pipeline

  bottom, _ = split_model(model, stage)
  bottom_vars = _subtree(variables, set(model.stage_names()[:stage]))
  apply = functools.partial(bottom.apply, train=False)
  cached, started = {}, time.time()
  for split, source in sources.items():
    views = 2 if flip and split == "train" else 1
    tag = f"_crops{crop_views}" if split == "train" and crop_views else ""
    path = None if directory is None else pathlib.Path(directory) / f"s{stage}_{image_size}px_{split}{tag}.npz"
    if path is not None and path.is_file():
      with np.load(path, allow_pickle=False) as data:
        n, expected = len(data["labels"]), views * len(source)
        if n == expected or (tag and n > expected):
          cached[split] = (data["features"], data["labels"])
          if log is not None:
            log(f"loaded cached {split} features from {path}")
          continue
    loader = pipeline.eval_loader(source, batch_size=batch_size, image_size=image_size)
    cached[split] = compute_features(apply, bottom_vars, loader, mean=mean, std=std, flip=views == 2)
    if split == "train" and crop_views:
      crops = pipeline.train_loader(source, batch_size=batch_size, image_size=image_size, seed=0,
                                    crop="random_resized", flip=True, scale=(0.25, 1.0))
      batches = (b for _, b in zip(range(crop_views * crops.steps_per_epoch), crops.iter_from(0)))
      extra = compute_features(apply, bottom_vars, batches, mean=mean, std=std)
      cached[split] = tuple(np.concatenate([a, b]) for a, b in zip(cached[split], extra))
    if path is not None:
      path.parent.mkdir(parents=True, exist_ok=True)
      np.savez(path, features=cached[split][0], labels=cached[split][1])
    if log is not None:
      log(f"cached {split}: features {cached[split][0].shape}, {time.time() - started:.1f}s so far")
  return cached


def pool_cached(model, variables: dict, cached: dict, *, stage: int, batch_size: int = 128) -> dict:
  """Runs the stages ``[stage, ...)`` of ``model`` (inference mode) over cached feature maps
  -> {split: (pooled features, labels)}."""
  names = model.stage_names()
  rest = model.clone(num_classes=0, start_stage=stage, end_stage=None, frozen_stages=0)
  run = jax.jit(functools.partial(rest.apply, _subtree(variables, set(names[stage:]))))
  return {split: (np.concatenate([np.asarray(run(x[i:i + batch_size]))
                                  for i in range(0, len(x), batch_size)]), y)
          for split, (x, y) in cached.items()}


def cached_transfer(key, model, variables: dict, cached: dict, *, stage: int, config: Config,
                    log=print) -> dict:
  """Trains the top of ``model`` (stages ``[stage, ...)`` + head) on :func:`cache_features` output.

  ``model`` carries the regime's options (``frozen_stages``...), ``variables`` the full
  pretrained variables, ``config`` the optimizer, freezing and length. Returns {"state",
  "variables" (full, trained), "history", "val", "test", "test_logits", "test_labels",
  "train_s"}.
  """
  started = time.time()
  count = len(model.stage_names())
  if stage < count and model.frozen_stages >= count:
    # Everything below the head is frozen: pool the cached maps once, train the head alone.
    cached = pool_cached(model, variables, cached, stage=stage)
    stage = count
  _, top = split_model(model, stage)
  state, history = fit_cached(key, top, top_variables(variables, model, stage), cached["train"],
                              config=config, validation=cached.get("val"), log=log)
  out = {"state": state, "history": history, "train_s": time.time() - started,
         "variables": merge_variables(variables, jax.device_get(state.variables))}
  for split in ("val", "test"):
    if split in cached:
      out[split] = evaluate_cached(state, *cached[split])
  if "test" in cached:
    out["test_logits"] = predict_cached(state, cached["test"][0])
    out["test_labels"] = cached["test"][1]
  return out


def split_epochs(epochs: int, head: int | None, *, recipe: tuple[int, int]) -> tuple[int, int]:
  """(head-only, fine-tuning) epochs of a two-phase run (head, then fine-tuning) of ``epochs``
  in all: ``head`` if given, else the recipe's ``(total, head)`` share of ``epochs``
  (recipe (20, 15), 8 epochs -> 6 + 2)."""
  total, recipe_head = recipe
  if head is None:
    head = round(epochs * recipe_head / total)
  if not 0 <= head <= epochs:
    raise ValueError(f"head-only epochs must be in [0, {epochs}] (the total), got {head}")
  return head, epochs - head


def split_steps(steps: int | None, head_epochs: int, *, examples: int,
                batch_size: int) -> tuple[int | None, int | None]:
  """(head-only, fine-tuning) step limits of a two-phase :func:`fit_cached` run stopped after
  ``steps`` in all: the head phase keeps its length if it fits, fine-tuning gets the rest
  (0: skip it). ``examples``: cached training examples (views included)."""
  if steps is None:
    return None, None
  per_epoch = examples // min(batch_size, examples)
  head = min(steps, head_epochs * per_epoch)
  return head, steps - head


def save_run(workdir, config: Config, model, variables: dict, *, class_names, metrics=None,
             step: int = 1) -> None:
  """Saves full-model ``variables`` as a jcv.train run (Orbax checkpoint, config, class names).

  ``python -m jcv evaluate|predict --workdir WORKDIR`` then work on runs trained with
  :func:`cached_transfer` exactly as on runs of :func:`jcv.train.fit`. ``config.model`` and
  ``config.model_options`` must rebuild ``model``.
  """
  import pathlib

  from jcv.train import checkpoint, log as log_lib

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tx, _ = make_optimizer(config, steps_per_epoch=1, total_steps=1)
  params = jax.tree.map(jnp.asarray, variables["params"])
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                     batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats", {})),
                     opt_state=tx.init(params), key=raw_key(jax.random.key(config.seed)),
                     apply_fn=model.apply, tx=tx)
  saver = checkpoint.RunCheckpointer(workdir / "checkpoints", best_metric=config.best_metric)
  saver.save(state, config=config.to_dict(),
             metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()
                                                   if k in ("loss", "top1", "top5")})
  saver.wait()
  saver.close()
  log_lib.write_json(workdir / "config.json", config.to_dict())
  log_lib.write_json(workdir / "class_names.json", list(class_names))
