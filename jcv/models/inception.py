"""The Inception family: GoogLeNet (Inception v1 with BN, torchvision), Inception-v3
(torchvision, no auxiliary head) and Inception-ResNet-v2 (Keras applications layout).

Every module is built from the shared inception branches of :mod:`jcv.models.blocks`
(:class:`~jcv.models.blocks.ConvBranch`, :class:`~jcv.models.blocks.PoolBranch`,
:class:`~jcv.models.blocks.InceptionV1Block`).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jcv.models.blocks import ConvBranch, InceptionV1Block, PoolBranch
from jcv.models.layers import ConvBNAct, classifier_head, max_pool
from jcv.models.registry import ModelCard, register

__all__ = ["GoogLeNet", "InceptionResNetV2", "InceptionResNetBlock", "InceptionV3",
           "googlenet", "inception_resnet_v2", "inception_v3"]


def _cat(*xs):
  return jnp.concatenate(xs, axis=-1)


# ----------------------------------------------------------------------------- GoogLeNet

# (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of the paper's Table 1.
_V1_BLOCKS = {
    "3a": (64, 96, 128, 16, 32, 32), "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64), "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64), "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128), "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
  """Inception v1 with BatchNorm as torchvision (no auxiliary heads, "5x5" branches are 3x3).

  ``wide_kernel=5`` gives the paper's 5x5 branches instead (more parameters than the table).
  """
  num_classes: int = 1000
  dropout_rate: float = 0.2
  wide_kernel: int = 3
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    x = ConvBNAct(64, 7, strides=2, padding=3, name="conv1", **common)(x, train)
    x = max_pool(x, 3, 2, ceil_mode=True)
    x = ConvBNAct(64, 1, padding=0, name="conv2", **common)(x, train)
    x = ConvBNAct(192, 3, padding=1, name="conv3", **common)(x, train)
    x = max_pool(x, 3, 2, ceil_mode=True)
    for name, spec in _V1_BLOCKS.items():
      if name in ("4a", "5a"):
        x = max_pool(x, 3 if name == "4a" else 2, 2, ceil_mode=True)
      x = InceptionV1Block(*spec, wide_kernel=self.wide_kernel, name=f"inception{name}",
                           **common)(x, train)
    return classifier_head(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                           train=train, dtype=self.dtype)


# ----------------------------------------------------------------------------- Inception-v3


class _InceptionV3Block(nn.Module):
  """One of torchvision's InceptionA..E modules (``kind``), ``width`` = pool_features or c7."""
  kind: str
  width: int = 0
  common: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = dict(self.common or {})
    B = lambda specs, name: ConvBranch(specs, name=name, **c)(x, train)  # noqa: E731
    if self.kind == "A":
      return _cat(B([(64, 1)], "branch1x1"),
                  B([(48, 1), (64, 5)], "branch5x5"),
                  B([(64, 1), (96, 3), (96, 3)], "branch3x3dbl"),
                  PoolBranch(self.width, pool="avg", padding=1, name="branch_pool", **c)(x, train))
    if self.kind == "B":
      return _cat(B([(384, 3, 2, "VALID")], "branch3x3"),
                  B([(64, 1), (96, 3), (96, 3, 2, "VALID")], "branch3x3dbl"),
                  max_pool(x, 3, 2))
    if self.kind == "C":
      c7 = self.width
      return _cat(B([(192, 1)], "branch1x1"),
                  B([(c7, 1), (c7, (1, 7)), (192, (7, 1))], "branch7x7"),
                  B([(c7, 1), (c7, (7, 1)), (c7, (1, 7)), (c7, (7, 1)), (192, (1, 7))], "branch7x7dbl"),
                  PoolBranch(192, pool="avg", padding=1, name="branch_pool", **c)(x, train))
    if self.kind == "D":
      return _cat(B([(192, 1), (320, 3, 2, "VALID")], "branch3x3"),
                  B([(192, 1), (192, (1, 7)), (192, (7, 1)), (192, 3, 2, "VALID")], "branch7x7x3"),
                  max_pool(x, 3, 2))
    if self.kind == "E":
      y = B([(384, 1)], "branch3x3_1")
      z = B([(448, 1), (384, 3)], "branch3x3dbl_1")
      split = lambda h, name: _cat(  # noqa: E731
          ConvBranch([(384, (1, 3))], name=name + "a", **c)(h, train),
          ConvBranch([(384, (3, 1))], name=name + "b", **c)(h, train))
      return _cat(B([(320, 1)], "branch1x1"), split(y, "branch3x3_2"), split(z, "branch3x3dbl_3"),
                  PoolBranch(192, pool="avg", padding=1, name="branch_pool", **c)(x, train))
    raise ValueError(f"unknown Inception-v3 block kind {self.kind!r}")


class InceptionV3(nn.Module):
  """Inception-v3 (Szegedy et al. 2015) as torchvision, without the auxiliary classifier."""
  num_classes: int = 1000
  dropout_rate: float = 0.5
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    x = ConvBranch([(32, 3, 2, "VALID"), (32, 3, 1, "VALID"), (64, 3)], name="stem1", **common)(x, train)
    x = max_pool(x, 3, 2)
    x = ConvBranch([(80, 1), (192, 3, 1, "VALID")], name="stem2", **common)(x, train)
    x = max_pool(x, 3, 2)
    blocks = [("5b", "A", 32), ("5c", "A", 64), ("5d", "A", 64), ("6a", "B", 0), ("6b", "C", 128),
              ("6c", "C", 160), ("6d", "C", 160), ("6e", "C", 192), ("7a", "D", 0), ("7b", "E", 0),
              ("7c", "E", 0)]
    for name, kind, width in blocks:
      x = _InceptionV3Block(kind, width, common, name=f"mixed_{name}")(x, train)
    return classifier_head(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                           train=train, dtype=self.dtype)


# ----------------------------------------------------------------------------- Inception-ResNet-v2


class InceptionResNetBlock(nn.Module):
  """Inception-ResNet-v2 residual block (``'block35'``, ``'block17'`` or ``'block8'``, Keras layout).

  Branches are concatenated, projected back to the input width by a linear 1x1 conv with bias
  (no BN), scaled by ``scale`` and added to the input; then ReLU unless ``activate=False``.
  """
  block_type: str
  scale: float
  activate: bool = True
  common: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = dict(self.common or {})
    B = lambda specs, name: ConvBranch(specs, name=name, **c)(x, train)  # noqa: E731
    if self.block_type == "block35":
      mixed = _cat(B([(32, 1)], "branch_0"), B([(32, 1), (32, 3)], "branch_1"),
                   B([(32, 1), (48, 3), (64, 3)], "branch_2"))
    elif self.block_type == "block17":
      mixed = _cat(B([(192, 1)], "branch_0"), B([(128, 1), (160, (1, 7)), (192, (7, 1))], "branch_1"))
    elif self.block_type == "block8":
      mixed = _cat(B([(192, 1)], "branch_0"), B([(192, 1), (224, (1, 3)), (256, (3, 1))], "branch_1"))
    else:
      raise ValueError(f"block_type must be 'block35', 'block17' or 'block8', got {self.block_type!r}")
    up = ConvBNAct(x.shape[-1], 1, use_bn=False, act=None, dtype=c.get("dtype"), name="up")(mixed)
    x = x + self.scale * up
    return nn.relu(x) if self.activate else x


class InceptionResNetV2(nn.Module):
  """Inception-ResNet-v2 (Szegedy et al. 2016) as Keras applications: BN without scale (a shift only).

  Stem, mixed 5b, 10 x block35 (scale 0.17), reduction 6a, 20 x block17 (0.1), reduction 7a,
  10 x block8 (0.2; the last scale 1 and linear), conv 7b 1536, global average pool.
  """
  num_classes: int = 1000
  dropout_rate: float = 0.0
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    c = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, bn_use_scale=False,
             dtype=self.dtype)
    B = lambda specs, name, h: ConvBranch(specs, name=name, **c)(h, train)  # noqa: E731
    V = "VALID"
    x = B([(32, 3, 2, V), (32, 3, 1, V), (64, 3)], "stem1", x)
    x = max_pool(x, 3, 2)
    x = B([(80, 1, 1, V), (192, 3, 1, V)], "stem2", x)
    x = max_pool(x, 3, 2)
    x = _cat(B([(96, 1)], "mixed_5b_branch_0", x), B([(48, 1), (64, 5)], "mixed_5b_branch_1", x),
             B([(64, 1), (96, 3), (96, 3)], "mixed_5b_branch_2", x),
             PoolBranch(64, pool="avg", count_include_pad=False, name="mixed_5b_branch_pool",
                        **c)(x, train))
    for i in range(10):
      x = InceptionResNetBlock("block35", 0.17, common=c, name=f"block35_{i + 1}")(x, train)
    x = _cat(B([(384, 3, 2, V)], "mixed_6a_branch_0", x),
             B([(256, 1), (256, 3), (384, 3, 2, V)], "mixed_6a_branch_1", x), max_pool(x, 3, 2))
    for i in range(20):
      x = InceptionResNetBlock("block17", 0.1, common=c, name=f"block17_{i + 1}")(x, train)
    x = _cat(B([(256, 1), (384, 3, 2, V)], "mixed_7a_branch_0", x),
             B([(256, 1), (288, 3, 2, V)], "mixed_7a_branch_1", x),
             B([(256, 1), (288, 3), (320, 3, 2, V)], "mixed_7a_branch_2", x), max_pool(x, 3, 2))
    for i in range(9):
      x = InceptionResNetBlock("block8", 0.2, common=c, name=f"block8_{i + 1}")(x, train)
    x = InceptionResNetBlock("block8", 1.0, activate=False, common=c, name="block8_10")(x, train)
    x = B([(1536, 1)], "conv_7b", x)
    return classifier_head(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                           train=train, dtype=self.dtype)


@register(ModelCard(
    "googlenet", paper="Szegedy et al. Going Deeper with Convolutions (Inception v1; BN and "
    "no auxiliary heads as torchvision)", year=2014, reference_params=6_624_904, input_size=224))
def googlenet(*, num_classes: int = 1000, **options) -> GoogLeNet:
  """GoogLeNet / Inception v1 (torchvision). Options: ``dropout_rate``, ``wide_kernel``, ``dtype``, BN momentum/epsilon."""
  return GoogLeNet(num_classes=num_classes, **options)


@register(ModelCard(
    "inception_v3", paper="Szegedy et al. Rethinking the Inception Architecture for Computer "
    "Vision (torchvision, no auxiliary head)", year=2015, reference_params=23_834_568,
    input_size=299))
def inception_v3(*, num_classes: int = 1000, **options) -> InceptionV3:
  """Inception-v3 (torchvision, no aux head). Options: ``dropout_rate``, ``dtype``, BN momentum/epsilon."""
  return InceptionV3(num_classes=num_classes, **options)


@register(ModelCard(
    "inception_resnet_v2", paper="Szegedy, Ioffe, Vanhoucke, Alemi. Inception-v4, "
    "Inception-ResNet and the Impact of Residual Connections on Learning (Keras layout)",
    year=2016, reference_params=55_813_192, input_size=299,
    notes="Keras counts 55,873,736 in all; 60,544 of them are BN moving statistics "
    "(batch_stats here), leaving 55,813,192 trainable."))
def inception_resnet_v2(*, num_classes: int = 1000, **options) -> InceptionResNetV2:
  """Inception-ResNet-v2 (Keras). Options: ``dropout_rate``, ``dtype``, BN momentum/epsilon."""
  return InceptionResNetV2(num_classes=num_classes, **options)
