"""Blocks that model families assemble from :mod:`jcv.models.layers`.

The inception branches (:class:`ConvBranch`, :class:`PoolBranch`) and GoogLeNet's
:class:`InceptionV1Block`; the ResNet residual blocks (:class:`BasicBlock`,
:class:`Bottleneck`) with projection or zero-pad shortcuts. Every convolution, BatchNorm and
pool here is a layer of :mod:`jcv.models.layers`, so the blocks get its kernels.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jcv.models.layers import ConvBNAct, avg_pool, max_pool

__all__ = ["BasicBlock", "Bottleneck", "ConvBranch", "InceptionV1Block", "PoolBranch"]

Dtype = Any


# ----------------------------------------------------------------------------- inception


class ConvBranch(nn.Module):
  """A chain of :class:`ConvBNAct` layers, one per spec ``(features, kernel, strides=1, padding='SAME')``.

  The building block of every inception module (``conv_0``, ``conv_1``, ... in order).
  """
  specs: Sequence[tuple]
  act: Callable | None = nn.relu
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  bn_use_scale: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, spec in enumerate(self.specs):
      features, kernel, strides, padding = tuple(spec) + (None, None, 1, "SAME")[len(spec):]
      x = ConvBNAct(features, kernel, strides=strides, padding=padding, act=self.act,
                    bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                    bn_use_scale=self.bn_use_scale, dtype=self.dtype, name=f"conv_{i}")(x, train)
    return x


class PoolBranch(nn.Module):
  """Inception pooling branch: a 3x3 pool (``'max'`` or ``'avg'``), then a 1x1 :class:`ConvBNAct`.

  ``features=None`` skips the projection (the pass-through pool of reduction blocks).
  """
  features: int | None = None
  pool: str = "avg"
  window: int = 3
  strides: int = 1
  padding: Any = "SAME"
  count_include_pad: bool = True
  ceil_mode: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  bn_use_scale: bool = True
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.pool == "max":
      x = max_pool(x, self.window, self.strides, padding=self.padding, ceil_mode=self.ceil_mode)
    elif self.pool == "avg":
      x = avg_pool(x, self.window, self.strides, padding=self.padding,
                   count_include_pad=self.count_include_pad)
    else:
      raise ValueError(f"PoolBranch pool must be 'max' or 'avg', got {self.pool!r}")
    if self.features is not None:
      x = ConvBNAct(self.features, 1, bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                    bn_use_scale=self.bn_use_scale, dtype=self.dtype, name="conv")(x, train)
    return x


class InceptionV1Block(nn.Module):
  """GoogLeNet inception module (with BN, as torchvision): 1x1 | 1x1-3x3 | 1x1-"5x5" | pool-1x1.

  ``wide_kernel=3`` reproduces torchvision's GoogLeNet, whose "5x5" branch really is 3x3
  (kept there for weight compatibility; its 6,624,904 parameters count it that way);
  ``wide_kernel=5`` is the paper.
  """
  ch1x1: int
  ch3x3red: int
  ch3x3: int
  ch5x5red: int
  ch5x5: int
  pool_proj: int
  wide_kernel: int = 3
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-3
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    return jnp.concatenate([
        ConvBranch([(self.ch1x1, 1)], name="branch1", **common)(x, train),
        ConvBranch([(self.ch3x3red, 1), (self.ch3x3, 3)], name="branch2", **common)(x, train),
        ConvBranch([(self.ch5x5red, 1), (self.ch5x5, self.wide_kernel)], name="branch3", **common)(x, train),
        PoolBranch(self.pool_proj, pool="max", strides=1, padding=1, ceil_mode=True, name="branch4",
                   **common)(x, train),
    ], axis=-1)


# ----------------------------------------------------------------------------- residual


class BasicBlock(nn.Module):
  """ResNet basic block: 3x3 conv-BN-ReLU, 3x3 conv-BN, add the shortcut, ReLU.

  The shortcut changes shape (stride or width) by ``shortcut='projection'`` (1x1 conv + BN,
  ImageNet ResNets) or ``'zero_pad'`` (strided identity padded with zero channels: the
  parameter-free "option A" of the CIFAR ResNets).
  """
  features: int
  strides: int = 1
  shortcut: str = "projection"
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype | None = None

  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    last_init = nn.initializers.zeros_init() if self.zero_init_residual else nn.initializers.ones_init()
    y = ConvBNAct(self.features, 3, strides=self.strides, padding=1, name="conv1", **common)(x, train)
    shortcut = _shortcut(self, x, self.features, train, common)
    return ConvBNAct(self.features, 3, padding=1, bn_scale_init=last_init, name="conv2",
                     **common)(y, train, residual=shortcut)  # relu(BN(conv(y)) + shortcut)


class Bottleneck(nn.Module):
  """ResNet bottleneck (v1.5, stride on the 3x3 as torchvision): 1x1, 3x3, 1x1 x4, add, ReLU."""
  features: int
  strides: int = 1
  shortcut: str = "projection"
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype | None = None

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    last_init = nn.initializers.zeros_init() if self.zero_init_residual else nn.initializers.ones_init()
    out = self.features * self.expansion
    y = ConvBNAct(self.features, 1, padding=0, name="conv1", **common)(x, train)
    y = ConvBNAct(self.features, 3, strides=self.strides, padding=1, name="conv2", **common)(y, train)
    shortcut = _shortcut(self, x, out, train, common)
    return ConvBNAct(out, 1, padding=0, bn_scale_init=last_init, name="conv3", **common)(y, train, residual=shortcut)


def _shortcut(block, x, features, train, common):
  if block.strides == 1 and x.shape[-1] == features:
    return x
  if block.shortcut == "projection":
    return ConvBNAct(features, 1, strides=block.strides, padding=0, act=None, name="downsample",
                     **common)(x, train)
  if block.shortcut == "zero_pad":
    x = x[:, ::block.strides, ::block.strides, :]
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  raise ValueError(f"shortcut must be 'projection' or 'zero_pad', got {block.shortcut!r}")
