"""SPP-net (He et al. 2014): the ZF-5 trunk, a spatial pyramid pool and the fc6/fc7/fc8 head.

The pyramid of the paper's ImageNet classifier, {6x6, 3x3, 2x2, 1x1} bins (50 bins x 256
channels = 12,800 features), makes the fully connected layers independent of the input
size: the same weights classify 64, 180 or 224 px images (any size >= 64).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn

from jcv.models.alexnet import zf5_trunk
from jcv.models.layers import SpatialPyramidPool, mlp_head
from jcv.models.registry import ModelCard, register

__all__ = ["SPPNet", "spp_net"]


class SPPNet(nn.Module):
  """ZF-5 convolutions + :class:`~jcv.models.layers.SpatialPyramidPool` (``levels``) + 4096-4096 head."""
  num_classes: int = 1000
  levels: Sequence[int] = (6, 3, 2, 1)
  dropout_rate: float = 0.5
  lrn: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if min(x.shape[1:3]) < 64:
      raise ValueError(f"spp_net needs images of at least 64x64 pixels, got {x.shape[1:3]}")
    x = zf5_trunk(x, dtype=self.dtype, lrn=self.lrn)
    x = SpatialPyramidPool(self.levels, name="spp")(x)
    return mlp_head(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate, train=train,
                    dtype=self.dtype)


@register(ModelCard(
    "spp_net", paper="He, Zhang, Ren, Sun. Spatial Pyramid Pooling in Deep Convolutional "
    "Networks for Visual Recognition (ZF-5 SPP-net)", year=2014, reference_params=77_037_672,
    input_size=224,
    notes="No official count; 77,037,672 = ZF-5 convs 3,726,464 + fc6 12800x4096 + fc7 "
    "4096x4096 + fc8 4096x1000 (+biases). The 4-level pyramid {6,3,2,1} of the paper gives "
    "12,800 features for any input size >= 64 px."))
def spp_net(*, num_classes: int = 1000, **options) -> SPPNet:
  """SPP-net on the ZF-5 trunk. Options: ``levels``, ``dropout_rate``, ``lrn``, ``dtype``."""
  return SPPNet(num_classes=num_classes, **options)
