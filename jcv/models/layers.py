"""Shared layers every model family builds on."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcv.models.conv_ops import conv2d

__all__ = ["Conv", "ConvBNAct"]

Dtype = Any


class Conv(nn.Module):
  """Drop-in for ``nn.Conv`` (same ``kernel``/``bias`` parameter names and HWIO layout).

  Calls :func:`jcv.models.conv_ops.conv2d`, which picks the fastest exact lowering for the
  backend. ``feature_group_count == in_features`` is a depthwise convolution.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  feature_group_count: int = 1
  kernel_dilation: int | Sequence[int] = 1
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x):
    ks = tuple(self.kernel_size) if not isinstance(self.kernel_size, int) else (self.kernel_size,) * 2
    cin = x.shape[-1]
    if cin % self.feature_group_count:
      raise ValueError(f"input channels {cin} not divisible by feature_group_count {self.feature_group_count}")
    kernel = self.param("kernel", self.kernel_init,
                        ks + (cin // self.feature_group_count, self.features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = conv2d(x, kernel, strides=self.strides, padding=self.padding,
               groups=self.feature_group_count, dilation=self.kernel_dilation)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class ConvBNAct(nn.Module):
  """Conv + BatchNorm + activation: the course's basic block.

  ``act=None`` gives a linear (no activation) output, e.g. MobileNetV2's projection.
  ``groups=-1`` means depthwise (one group per input channel).
  """
  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  groups: int = 1
  act: Callable | None = nn.relu
  use_bn: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype | None = None
  kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

  @nn.compact
  def __call__(self, x, train: bool = False):
    groups = x.shape[-1] if self.groups == -1 else self.groups
    ks = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    x = Conv(self.features, ks, strides=self.strides, padding=self.padding,
             feature_group_count=groups, use_bias=not self.use_bn, dtype=self.dtype,
             kernel_init=self.kernel_init, name="conv")(x)
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       epsilon=self.bn_epsilon, dtype=self.dtype, name="bn")(x)
    if self.act is not None:
      x = self.act(x)
    return x
