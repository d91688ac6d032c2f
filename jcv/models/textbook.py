"""``textbook_cnn``: the CIFAR-10 network of the course's homework 2 and of most textbooks.

Blocks of [3x3 conv -> ReLU -> 3x3 conv -> ReLU -> 2x2 max pool -> dropout] (``widths``: one
block per entry, 32-64-128 filters by default; two entries give the two-block version),
then flatten, a Dense-ReLU layer with dropout and the classifier, as Keras' ``cifar10_cnn``
example and Chollet's book write it. ``batch_norm=True`` puts BatchNorm between every
convolution and its ReLU (the convolutions then have no bias). Convolutions use "same"
padding, so any input size works; the flatten makes the hidden layer's parameter count grow
with it (at 32 px, 4x4x128 = 2,048 inputs). Kernels start He-normal (Keras: Glorot-uniform).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jcv.models.layers import ConvBNAct, max_pool, mlp_head
from jcv.models.registry import ModelCard, register

__all__ = ["TextbookCNN", "textbook_cnn"]


class TextbookCNN(nn.Module):
  """``len(widths)`` Conv-Conv-Pool-Dropout blocks, flatten, Dense-ReLU-Dropout, Dense.

  ``num_classes=0`` returns the hidden layer's activations ``[B, hidden]``.
  """
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  batch_norm: bool = False
  block_dropout: float = 0.25
  hidden: int = 512
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(use_bn=self.batch_norm, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                  dtype=self.dtype)
    for s, width in enumerate(self.widths):
      for i in range(2):
        x = ConvBNAct(width, 3, name=f"conv{s + 1}_{i + 1}", **common)(x, train)
      x = max_pool(x, 2, 2)
      if self.block_dropout > 0:
        x = nn.Dropout(self.block_dropout, deterministic=not train)(x)
    x = mlp_head(x, num_classes=self.num_classes, hidden=(self.hidden,), dropout_rate=self.dropout_rate,
                 train=train, dtype=self.dtype, dropout_first=False)
    return x.astype(jnp.float32)


@register(ModelCard(
    "textbook_cnn", paper="Course homework 2: the textbook CIFAR-10 CNN (Conv-Conv-Pool-Dropout blocks, "
    "Dense-Dropout head; Keras' cifar10_cnn example)", year=None, reference_params=1_341_226, input_size=32,
    default_num_classes=10,
    notes="Our build of the textbook design: 1,341,226 parameters at 32 px and 10 classes (convs 287,008, "
          "fc6 2048x512 1,049,088, head 5,130); the flatten makes the count depend on the input size."))
def textbook_cnn(*, num_classes: int = 10, **options) -> TextbookCNN:
  """The homework-2 CNN. Options: ``widths``, ``batch_norm``, ``block_dropout``, ``hidden``, ``dropout_rate``,
  ``dtype``, BN momentum/epsilon."""
  return TextbookCNN(num_classes=num_classes, **options)
