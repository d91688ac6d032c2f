"""Losses and metrics for classification: soft-label cross-entropy, L2 penalty, top-k."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

__all__ = ["cross_entropy", "smooth_labels", "l2_penalty", "topk_correct"]


def smooth_labels(labels, *, smoothing: float):
  """Label smoothing on one-hot/soft labels [B, C]: (1 - s) * y + s / C."""
  if smoothing == 0.0:
    return labels
  num_classes = labels.shape[-1]
  return labels * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy(logits, labels, *, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy [B]; ``labels`` are int [B] or soft [B, C]."""
  logits = logits.astype(jnp.float32)
  if labels.ndim == logits.ndim - 1:
    labels = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  labels = smooth_labels(labels.astype(jnp.float32), smoothing=label_smoothing)
  return optax.softmax_cross_entropy(logits, labels)


def l2_penalty(params, mask=None):
  """sum over decayed weights of ||w||^2 / 2 — the lecture's L2 term (multiply by lambda)."""
  leaves = jax.tree.leaves(params)
  if mask is not None:
    flags = jax.tree.leaves(mask)
    leaves = [w for w, m in zip(leaves, flags) if m]
  return 0.5 * sum(jnp.sum(jnp.square(w.astype(jnp.float32))) for w in leaves)


def topk_correct(logits, labels, *, k: int):
  """Per-example 1.0 where the int label is among the k largest logits, else 0.0 [B].

  Garbage never counts as correct: a row with a NaN/inf logit, or a label outside
  [0, num_classes), is a miss (0.0).
  """
  num_classes = logits.shape[-1]
  k = min(k, num_classes)
  labels = labels.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes) & jnp.all(jnp.isfinite(logits), axis=-1)
  label_logit = jnp.take_along_axis(logits, jnp.clip(labels, 0, num_classes - 1)[:, None], axis=-1)
  # Rank = number of classes with a strictly larger logit (ties count in the label's favour).
  rank = jnp.sum(logits > label_logit, axis=-1)
  return ((rank < k) & valid).astype(jnp.float32)
