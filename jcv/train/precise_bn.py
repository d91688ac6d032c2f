"""Precise BatchNorm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): after training,
the running statistics are replaced by plain averages over many training batches."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jcv.train import parallel, step as step_lib

__all__ = ["recompute_batch_stats", "first_batches"]


def recompute_batch_stats(state, batches, mesh, *, augment_fn=None, mean=None, std=None, freeze=()):
  """Returns ``state`` whose BatchNorm running statistics are replaced by plain averages, over
  ``batches`` (host dicts with "image" and "label", global batches of equal size), of the
  statistics each batch gets in train mode with the training augmentation.

  The running averages training leaves behind weight the last few batches most (momentum 0.6
  at batch 128 is ~300 images); this uses as many as given. Works for any Flax model whose
  BatchNorm layers update ``momentum * old + (1 - momentum) * batch``: each layer's momentum
  is read off one batch run with running statistics of 0 and of 1. Layers matching
  ``freeze`` keep theirs.
  """
  if not state.batch_stats:
    return state
  fn = jax.jit(functools.partial(step_lib.bn_update, augment_fn=augment_fn, mean=mean, std=std))
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  total, count, momentum = None, 0, None
  for index, batch in enumerate(batches):
    batch = parallel.shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
    scaled = fn(state, batch, zeros, index)  # (1 - momentum) * this batch's statistics
    if momentum is None:
      ones = jax.tree.map(jnp.ones_like, state.batch_stats)
      momentum = jax.tree.map(lambda a, b: jnp.mean(a - b), fn(state, batch, ones, index), scaled)
    total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
    count += 1
  if not count:
    raise ValueError("recompute_batch_stats needs at least one batch")
  new = jax.tree.map(lambda t, m, old: jnp.where(1 - m > 1e-6, t / (count * (1 - m)), old),
                     total, momentum, state.batch_stats)
  new = step_lib._keep_frozen_stats(new, state.batch_stats, tuple(freeze))
  return state.replace(batch_stats=new)


def first_batches(loader, num_images: int, global_batch: int):
  """The first ceil(num_images / global_batch) batches of the loader's first epoch."""
  iterator = loader.iter_from(0)
  try:
    for _ in range(min(-(-num_images // global_batch), loader.steps_per_epoch)):
      yield next(iterator)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()
