"""Pure train and eval steps.

``train_step(state, batch)``: on-device augmentation -> normalisation -> ``model.apply``
(train mode, BatchNorm statistics updated, dropout rng) -> loss -> grads -> Optax update.
The randomness comes from ``state.key`` folded with ``state.step``, so a step is a pure
function of ``(state, batch)``; parallel.py wraps these functions, never reaches into them.
"""
from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jcv import kernels
from jcv.data import augment as augment_lib
from jcv.train import invariance, losses, optax_extras
from jcv.train.optim import decay_mask, param_paths

__all__ = ["train_step", "eval_step", "predict_logits", "to_model_input", "bn_update"]


def to_model_input(images, *, mean=None, std=None):
  """uint8 (or float in [0, 1]) NHWC images -> float32, normalised with mean/std if given."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 255.0
  images = images.astype(jnp.float32)
  if mean is not None:
    images = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return images


def _keep_frozen_stats(new_stats, old_stats, freeze):
  """Running statistics of frozen layers stay as they were."""
  if not freeze or not old_stats:
    return new_stats
  pattern = re.compile("|".join(f"(?:{p})" for p in freeze))
  paths = param_paths(old_stats)
  return jax.tree.map(lambda p, new, old: old if pattern.search(p) else new, paths, new_stats, old_stats)


def train_step(state, batch, *, augment_fn: Callable | None = None, num_classes: int,
               mean=None, std=None, label_smoothing: float = 0.0, l2_weight: float = 0.0,
               decay_bn_and_bias: bool = False, l2_exclude: Callable | None = None, freeze=(),
               schedule=None, axis_name: str | None = None, sync_batch_stats: bool = True):
  """One optimizer step on ``batch`` {"image": uint8 NHWC, "label": int [B]} -> (state, metrics).

  Options (keyword-only): ``augment_fn(key, images_uint8, labels_int) -> (images_float
  in [0, 1], soft_labels [B, C])`` (e.g. ``jcv.data.augment.make_augment``; None = no
  augmentation); ``mean``/``std`` normalisation; ``label_smoothing``; ``l2_weight`` adds
  ``l2_weight * ||w||^2 / 2`` over decayed weights to the loss (the lecture's weight decay;
  ``l2_exclude(params)`` -> bool pytree removes some, e.g. Muon's kernels);
  ``freeze`` keeps those layers' BN statistics; ``schedule`` reports the learning rate;
  ``axis_name`` (per-device SPMD only) averages grads, BN statistics and metrics with pmean;
  there BatchNorm normalises over the global batch unless ``sync_batch_stats=False``.
  Augmentation and dropout draw per example from the step key and the example's global index
  (:mod:`jcv.train.invariance`), so results do not depend on the device count.
  Metrics: loss, top1, top5 (batch means), lr, grad_norm.
  """
  step_key = jax.random.fold_in(state.key, state.step)
  aug_key, dropout_key = jax.random.split(step_key)
  images, labels = batch["image"], batch["label"]
  indices = invariance.example_indices(labels.shape[0], axis_name)
  if augment_fn is not None:
    images, soft = invariance.augment_per_example(aug_key, images, labels, indices,
                                                  augment_fn=augment_fn)
  else:
    soft = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  x = to_model_input(images, mean=mean, std=std)

  def loss_fn(params):
    variables = {"params": params}
    mutable = []
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
      mutable = ["batch_stats"]
    # kernels.fused_inference: layers whose BatchNorm is frozen (inference mode) fold it into the
    # conv, differentiably; the others train as written
    with invariance.model_context(indices=indices, axis_name=axis_name, sync_batch_stats=sync_batch_stats), \
         kernels.fused_inference():
      out = state.apply_fn(variables, x, train=True, mutable=mutable, rngs={"dropout": dropout_key})
    logits, new_vars = out
    loss = jnp.mean(losses.cross_entropy(logits, soft, label_smoothing=label_smoothing))
    total = loss
    if l2_weight:
      total = total + l2_weight * losses.l2_penalty(
          params, decay_mask(params, decay_bn_and_bias=decay_bn_and_bias,
                             exclude=l2_exclude(params) if l2_exclude else None))
    return total, (loss, logits, new_vars.get("batch_stats", {}))

  grads, (loss, logits, new_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  metrics = {
      "loss": loss,
      "top1": jnp.mean(losses.topk_correct(logits, labels, k=1)),
      "top5": jnp.mean(losses.topk_correct(logits, labels, k=5)),
  }
  if axis_name is not None:
    # Per-device SPMD: each device saw 1/n of the batch; average to the global-batch values.
    grads = jax.lax.pmean(grads, axis_name)
    new_stats = jax.lax.pmean(new_stats, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  new_stats = _keep_frozen_stats(new_stats, state.batch_stats, freeze)
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["lr"] = (jnp.asarray(schedule(state.step), jnp.float32) * optax_extras.plateau_factor(state.opt_state)
                   if schedule is not None else jnp.zeros((), jnp.float32))
  return state.apply_gradients(grads, batch_stats=new_stats), metrics


def bn_update(state, batch, stats_in, index, *, augment_fn: Callable | None = None, mean=None,
              std=None):
  """The BatchNorm statistics ``model.apply`` (train mode) returns for ``batch`` when the
  running statistics going in are ``stats_in``: ``momentum * stats_in + (1 - momentum) *
  batch statistics`` per layer. The batch is augmented as in training (key: ``state.key``
  folded with a constant and ``index``). Used by ``jcv.train.loop.recompute_batch_stats``.
  """
  key = jax.random.fold_in(jax.random.fold_in(state.key, 0x5EED), index)
  aug_key, dropout_key = jax.random.split(key)
  images, labels = batch["image"], batch["label"]
  if augment_fn is not None:
    images, _ = augment_fn(aug_key, images, labels)
  x = to_model_input(images, mean=mean, std=std)
  _, new_vars = state.apply_fn({"params": state.params, "batch_stats": stats_in}, x, train=True,
                               mutable=["batch_stats"], rngs={"dropout": dropout_key})
  return new_vars["batch_stats"]


def predict_logits(state, images, *, mean=None, std=None, tta_flip: bool = False,
                   tta_translate: int = 0, tta_multicrop: int | None = None):
  """Inference-mode logits (float32) for uint8 NHWC images; optional TTA (mean logits): flip,
  ``tta_translate`` pixels (``jcv.data.augment.tta_translate``: airbench's level 2), or the 5
  crops of size ``tta_multicrop`` (10 with flip; ``jcv.data.augment.tta_multicrop``)."""
  x = to_model_input(images, mean=mean, std=std)

  def apply(v):  # the folded inference form (jcv.kernels.fused_inference): same logits, fewer passes
    with kernels.fused_inference():
      return state.apply_fn(state.variables, v, train=False).astype(jnp.float32)
  if tta_multicrop:
    return augment_lib.tta_multicrop(apply, x, size=tta_multicrop, flip=tta_flip)
  if tta_translate:
    return augment_lib.tta_translate(apply, x, pixels=tta_translate, flip=tta_flip)
  if tta_flip:
    return augment_lib.tta_flip(apply, x)
  return apply(x)


def eval_step(state, batch, *, mean=None, std=None, tta_flip: bool = False, tta_translate: int = 0,
              tta_multicrop: int | None = None, axis_name: str | None = None):
  """Metric sums over the real examples of ``batch`` (``batch["mask"]`` marks padding).

  Returns {"loss", "top1", "top5", "count"} as sums; divide by "count" after summing
  over batches so every example counts exactly once.
  """
  logits = predict_logits(state, batch["image"], mean=mean, std=std, tta_flip=tta_flip,
                          tta_translate=tta_translate, tta_multicrop=tta_multicrop)
  labels = batch["label"]
  mask = batch.get("mask")
  mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  sums = {
      "loss": jnp.sum(losses.cross_entropy(logits, labels) * mask),
      "top1": jnp.sum(losses.topk_correct(logits, labels, k=1) * mask),
      "top5": jnp.sum(losses.topk_correct(logits, labels, k=5) * mask),
      "count": jnp.sum(mask),
  }
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums
