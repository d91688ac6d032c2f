"""Results that do not depend on the device count (``jcv.train.step`` uses these).

* Randomness per example: augmentation and dropout draw from ``fold_in(step key, global
  example index)``, never from a device index or a per-device batch shape, so example i gets
  the same random bits on 1, 2 or 8 devices, in ``jit`` and ``pmap`` mode alike.
* BatchNorm over the global batch in per-device (``pmap``) mode: the statistics are averaged
  over the data axis (``lax.pmean`` of mean and mean square, as Flax's ``axis_name`` does), as
  GSPMD does in ``jit`` mode. ``sync_batch_stats=False`` keeps per-device statistics.

Both work on any Flax model, through ``nn.intercept_methods``: no layer needs to know.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["example_indices", "example_keys", "augment_per_example", "model_context"]


def example_indices(local_batch: int, axis_name: str | None = None):
  """Global indices [local_batch] of this device's examples (jit: 0..B-1)."""
  offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * local_batch
  return offset + jnp.arange(local_batch)


def example_keys(key, indices):
  """One key per example: ``fold_in(key, global index)``."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def augment_per_example(key, images, labels, indices, *, augment_fn):
  """``augment_fn`` applied to each example with its own key. An augmentation that mixes
  examples (``augment_fn.mixes_examples``: mixup, cutmix) gets the batch and ``key`` instead."""
  if getattr(augment_fn, "mixes_examples", False):
    return augment_fn(key, images, labels)
  keys = example_keys(key, indices)
  x, y = jax.vmap(lambda k, im, lab: augment_fn(k, im[None], lab[None]))(keys, images, labels)
  return x[:, 0], y[:, 0]


def _dropout(module: nn.Dropout, inputs, deterministic, rng, indices):
  deterministic = nn.merge_param("deterministic", module.deterministic, deterministic)
  if module.rate == 0.0 or deterministic:
    return inputs
  if module.rate == 1.0:
    return jnp.zeros_like(inputs)
  keep = 1.0 - module.rate
  if rng is None:
    rng = module.make_rng(module.rng_collection)
  shape = list(inputs.shape)
  for dim in module.broadcast_dims:
    shape[dim] = 1
  mask = jax.vmap(lambda k: jax.random.bernoulli(k, keep, shape[1:]))(example_keys(rng, indices))
  mask = jnp.broadcast_to(mask, inputs.shape)
  return jax.lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


@contextlib.contextmanager
def model_context(*, indices=None, axis_name: str | None = None, sync_batch_stats: bool = True):
  """While active, ``nn.Dropout`` draws per-example masks for ``indices`` (global example
  indices of the batch on axis 0) and, with ``axis_name`` and ``sync_batch_stats``,
  ``nn.BatchNorm`` layers without an ``axis_name`` normalise over the whole data axis."""

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.Dropout) and indices is not None:
      inputs = args[0]
      broadcast_batch = 0 in tuple(d % max(inputs.ndim, 1) for d in module.broadcast_dims)
      if inputs.ndim and inputs.shape[0] == indices.shape[0] and not broadcast_batch:
        deterministic = args[1] if len(args) > 1 else kwargs.get("deterministic")
        rng = args[2] if len(args) > 2 else kwargs.get("rng")
        return _dropout(module, inputs, deterministic, rng, indices)
    if (isinstance(module, nn.BatchNorm) and axis_name is not None and sync_batch_stats
        and module.axis_name is None):
      object.__setattr__(module, "axis_name", axis_name)
      try:
        return next_fun(*args, **kwargs)
      finally:
        object.__setattr__(module, "axis_name", None)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
