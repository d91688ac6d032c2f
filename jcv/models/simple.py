"""``advanced_cnn``: the lecture 3_1 CNN built from the course's Conv + BatchNorm + ReLU blocks.

Four stages of two 3x3 :class:`~jcv.models.layers.ConvBNAct` blocks (32, 64, 128, 256
filters) each followed by a 2x2 max pool, then global average pooling, a 256-unit ReLU layer
and dropout before the classifier. Made for 2-class problems (cats vs dogs) at 160-224 px,
but any size and class count work.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jcv.models.layers import ConvBNAct, max_pool
from jcv.models.registry import ModelCard, register

__all__ = ["AdvancedCNN", "advanced_cnn"]


class AdvancedCNN(nn.Module):
  """``widths`` stages of ``convs_per_stage`` ConvBNAct + max pool, GAP, Dense-ReLU-dropout head.

  ``num_classes=0`` returns the globally pooled features ``[B, widths[-1]]``.
  """
  num_classes: int = 2
  widths: Sequence[int] = (32, 64, 128, 256)
  convs_per_stage: int = 2
  hidden: int = 256
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    for s, width in enumerate(self.widths):
      for i in range(self.convs_per_stage):
        x = ConvBNAct(width, 3, name=f"conv{s + 1}_{i + 1}", **common)(x, train)
      x = max_pool(x, 2, 2)
    x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32)  # f32 sum even in bf16
    if self.num_classes == 0:
      return x.astype(jnp.float32)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="fc")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


@register(ModelCard(
    "advanced_cnn", paper="Course lecture 3_1: a CNN of Conv-BN-ReLU blocks with dropout",
    year=None, reference_params=1_239_522, input_size=160, default_num_classes=2,
    notes="Our design (no published count): 1,239,522 parameters at 2 classes."))
def advanced_cnn(*, num_classes: int = 2, **options) -> AdvancedCNN:
  """The lecture 3_1 CNN. Options: ``widths``, ``convs_per_stage``, ``hidden``, ``dropout_rate``, ``dtype``, BN momentum/epsilon."""
  return AdvancedCNN(num_classes=num_classes, **options)
