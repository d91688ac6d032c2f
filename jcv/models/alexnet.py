"""AlexNet (Krizhevsky et al. 2012, torchvision's one-tower variant) and ZFNet (Zeiler & Fergus 2013).

Both are five convolutions with biases and ReLU, max pooling, an adaptive average pool to
6x6 (so inputs other than 224 px work) and the 4096-4096 dropout MLP head.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from jcv.models.layers import (ConvBNAct, LocalResponseNorm, adaptive_avg_pool, max_pool,
                               mlp_head)
from jcv.models.registry import ModelCard, register

__all__ = ["AlexNet", "ZFNet", "alexnet", "zfnet", "zf5_trunk"]


def _conv(features, kernel, strides=1, padding=0, *, name, dtype):
  # Plain convolution with bias and ReLU (these nets predate BatchNorm).
  return ConvBNAct(features, kernel, strides=strides, padding=padding, use_bn=False,
                   dtype=dtype, name=name)


class AlexNet(nn.Module):
  """torchvision AlexNet: 64-192-384-256-256 convolutions (11x11/4 first), 61,100,840 parameters."""
  num_classes: int = 1000
  dropout_rate: float = 0.5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    d = self.dtype
    x = _conv(64, 11, 4, 2, name="conv1", dtype=d)(x)
    x = max_pool(x, 3, 2)
    x = _conv(192, 5, 1, 2, name="conv2", dtype=d)(x)
    x = max_pool(x, 3, 2)
    x = _conv(384, 3, 1, 1, name="conv3", dtype=d)(x)
    x = _conv(256, 3, 1, 1, name="conv4", dtype=d)(x)
    x = _conv(256, 3, 1, 1, name="conv5", dtype=d)(x)
    x = max_pool(x, 3, 2)
    x = adaptive_avg_pool(x, 6)
    return mlp_head(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate, train=train,
                    dtype=d)


def zf5_trunk(x, *, dtype=None, lrn: bool = True):
  """The ZF-5 convolutional trunk (ZFNet, SPP-net): conv1..conv5, LRN after conv1/conv2.

  Call inside a compact ``__call__``. 224 px gives 13x13x256 before the last pool, as in the
  papers: 7x7/2 conv 96 -> 3x3/2 pool -> 5x5/2 conv 256 -> 3x3/2 pool -> 3x3 convs 384, 384, 256.
  """
  x = _conv(96, 7, 2, 1, name="conv1", dtype=dtype)(x)
  if lrn:
    x = LocalResponseNorm(name="lrn1")(x)
  x = max_pool(x, 3, 2, padding=1)
  x = _conv(256, 5, 2, 0, name="conv2", dtype=dtype)(x)
  if lrn:
    x = LocalResponseNorm(name="lrn2")(x)
  x = max_pool(x, 3, 2, padding=1)
  x = _conv(384, 3, 1, 1, name="conv3", dtype=dtype)(x)
  x = _conv(384, 3, 1, 1, name="conv4", dtype=dtype)(x)
  return _conv(256, 3, 1, 1, name="conv5", dtype=dtype)(x)


class ZFNet(nn.Module):
  """ZFNet: AlexNet with a 7x7/2 first convolution of 96 filters, 5x5/2 second, 384-384-256 after.

  The paper's layer sizes (Fig. 3) with a single tower, LRN ("contrast normalisation across
  feature maps") after conv1/conv2, pool5 6x6x256, and the 4096-4096 dropout head.
  """
  num_classes: int = 1000
  dropout_rate: float = 0.5
  lrn: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = zf5_trunk(x, dtype=self.dtype, lrn=self.lrn)
    x = max_pool(x, 3, 2)
    x = adaptive_avg_pool(x, 6)
    return mlp_head(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate, train=train,
                    dtype=self.dtype)


@register(ModelCard(
    "alexnet", paper="Krizhevsky, Sutskever, Hinton. ImageNet Classification with Deep "
    "Convolutional Neural Networks (torchvision one-tower variant of Krizhevsky 2014)",
    year=2012, reference_params=61_100_840, input_size=224))
def alexnet(*, num_classes: int = 1000, **options) -> AlexNet:
  """AlexNet (torchvision layout). Options: ``dropout_rate``, ``dtype``."""
  return AlexNet(num_classes=num_classes, **options)


@register(ModelCard(
    "zfnet", paper="Zeiler, Fergus. Visualizing and Understanding Convolutional Networks",
    year=2013, reference_params=62_357_608, input_size=224,
    notes="No official count exists; 62,357,608 is this single-tower build: conv1 7x7x3x96, "
    "conv2 5x5x96x256, conv3 3x3x256x384, conv4 3x3x384x384, conv5 3x3x384x256 (+biases) = "
    "3,726,464, fc6 9216x4096, fc7 4096x4096, fc8 4096x1000 (+biases) = 58,631,144. It is "
    "1,256,768 more than AlexNet's because every conv is wider: conv1 3->96 (AlexNet 3->64), "
    "conv2 96->256 (64->192), conv3 256->384 (192->384), conv4 384->384 (384->256), "
    "conv5 384->256 (256->256); the head is identical."))
def zfnet(*, num_classes: int = 1000, **options) -> ZFNet:
  """ZFNet (single tower, 7x7/2 first conv). Options: ``dropout_rate``, ``lrn``, ``dtype``."""
  return ZFNet(num_classes=num_classes, **options)
