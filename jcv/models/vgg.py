"""VGG (Simonyan & Zisserman 2014) in torchvision's layout: 3x3 convolutions, 2x2 max pools,
an adaptive average pool to 7x7 and the 4096-4096 dropout head. ``vgg11_bn``/``vgg16_bn`` add BatchNorm
after every convolution (keeping the convolution biases, as torchvision does).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn

from jcv.models.layers import ConvBNAct, adaptive_avg_pool, max_pool, mlp_head
from jcv.models.registry import ModelCard, register

__all__ = ["VGG", "VGG_CONFIGS", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "vgg19"]

# Convolution widths per stage; every stage ends with a 2x2 max pool.
VGG_CONFIGS = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
  """VGG with ``stages`` of 3x3 convolutions (see :data:`VGG_CONFIGS`); ``batch_norm`` for VGG-BN."""
  stages: Sequence[Sequence[int]] = VGG_CONFIGS[16]
  num_classes: int = 1000
  batch_norm: bool = False
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    for s, widths in enumerate(self.stages):
      for i, width in enumerate(widths):
        x = ConvBNAct(width, 3, padding=1, use_bn=self.batch_norm, use_bias=True,
                      bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                      name=f"conv{s + 1}_{i + 1}")(x, train)
      x = max_pool(x, 2, 2)
    x = adaptive_avg_pool(x, 7)
    return mlp_head(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate, train=train,
                    dtype=self.dtype, dropout_first=False)


_PAPER = "Simonyan, Zisserman. Very Deep Convolutional Networks for Large-Scale Image Recognition"


@register(ModelCard("vgg11", paper=_PAPER + " (configuration A)", year=2014,
                    reference_params=132_863_336, input_size=224))
def vgg11(*, num_classes: int = 1000, **options) -> VGG:
  """VGG-11 (configuration A). Options: ``batch_norm``, ``dropout_rate``, ``dtype``, BN momentum/epsilon."""
  return VGG(VGG_CONFIGS[11], num_classes=num_classes, **options)


@register(ModelCard("vgg16", paper=_PAPER + " (configuration D)", year=2014,
                    reference_params=138_357_544, input_size=224))
def vgg16(*, num_classes: int = 1000, **options) -> VGG:
  """VGG-16 (configuration D). Options: ``batch_norm``, ``dropout_rate``, ``dtype``, BN momentum/epsilon."""
  return VGG(VGG_CONFIGS[16], num_classes=num_classes, **options)


@register(ModelCard("vgg19", paper=_PAPER + " (configuration E)", year=2014,
                    reference_params=143_667_240, input_size=224))
def vgg19(*, num_classes: int = 1000, **options) -> VGG:
  """VGG-19 (configuration E). Options: ``batch_norm``, ``dropout_rate``, ``dtype``, BN momentum/epsilon."""
  return VGG(VGG_CONFIGS[19], num_classes=num_classes, **options)


@register(ModelCard("vgg16_bn", paper=_PAPER + " (configuration D, with BatchNorm as torchvision)",
                    year=2014, reference_params=138_365_992, input_size=224))
def vgg16_bn(*, num_classes: int = 1000, **options) -> VGG:
  """VGG-16 with BatchNorm after each convolution. Options: ``dropout_rate``, ``dtype``, BN momentum/epsilon."""
  return VGG(VGG_CONFIGS[16], num_classes=num_classes, batch_norm=True, **options)


@register(ModelCard("vgg11_bn", paper=_PAPER + " (configuration A, with BatchNorm as torchvision)",
                    year=2014, reference_params=132_868_840, input_size=224))
def vgg11_bn(*, num_classes: int = 1000, **options) -> VGG:
  """VGG-11 with BatchNorm after each convolution. Options: ``dropout_rate``, ``dtype``, BN momentum/epsilon."""
  return VGG(VGG_CONFIGS[11], num_classes=num_classes, batch_norm=True, **options)
