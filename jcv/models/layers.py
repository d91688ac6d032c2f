"""Shared layers every model family builds on.

Convolutions (:class:`Conv`, :class:`ConvBNAct`), pooling helpers with PyTorch's
``ceil_mode`` and adaptive pooling, :class:`SpatialPyramidPool` (SPP-net), the inception
branches (:class:`ConvBranch`, :class:`PoolBranch`, :class:`InceptionV1Block`), residual
blocks (:class:`BasicBlock`, :class:`Bottleneck`) and :func:`drop_path` (stochastic depth),
:class:`LocalResponseNorm` and the classifier heads (:func:`classifier_head`,
:func:`mlp_head`). Every convolution goes through :func:`jcv.kernels.conv2d` (unless a
:class:`Conv` is given another ``conv``), every BatchNorm is :class:`jcv.kernels.BatchNorm`.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# The one place jcv.models meets jcv.kernels: every layer's convolution, BatchNorm and
# max-pool come from there, and the lowering they follow is chosen there.
from jcv import kernels

__all__ = [
    "BasicBlock", "Bottleneck", "Conv", "ConvBNAct", "ConvBranch", "InceptionV1Block",
    "LocalResponseNorm", "PoolBranch", "SpatialPyramidPool", "adaptive_avg_pool",
    "adaptive_max_pool", "avg_pool", "classifier_head", "drop_path", "max_pool", "mlp_head",
    "pool_output_size", "variance_scaling", "xla_kernels",
]

Dtype = Any
_FUSED_ACTS = (nn.relu, nn.relu6, jax.nn.relu, jax.nn.relu6)  # ConvBNAct runs these inside BatchNorm


def variance_scaling(scale: float, mode: str, distribution: str) -> Callable:
  """``nn.initializers.variance_scaling`` for HWIO (or IO) kernels, sampled as one flat vector.

  Same fans (receptive field x in/out channels) and distributions as Flax's, but the random
  numbers are drawn 1-D and reshaped: with jax 0.10 on CPU, XLA takes seconds to compile a
  4-D ``jax.random`` draw (threefry over a 4-D iota), which made ``model.init`` of a small
  ResNet take ~30 s; the flat draw compiles in a fraction of that.
  """
  if mode not in ("fan_in", "fan_out", "fan_avg"):
    raise ValueError(f"mode must be 'fan_in', 'fan_out' or 'fan_avg', got {mode!r}")
  if distribution not in ("normal", "truncated_normal", "uniform"):
    raise ValueError(f"distribution must be 'normal', 'truncated_normal' or 'uniform', got {distribution!r}")

  def init(key, shape, dtype=jnp.float32):
    shape = tuple(shape)
    receptive = math.prod(shape[:-2]) if len(shape) > 2 else 1
    fan_in, fan_out = shape[-2] * receptive, shape[-1] * receptive
    denominator = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    variance = scale / max(1.0, denominator)
    size = (math.prod(shape),)
    if distribution == "normal":
      values = jax.random.normal(key, size, dtype) * math.sqrt(variance)
    elif distribution == "truncated_normal":  # std of a unit normal truncated to [-2, 2]
      values = jax.random.truncated_normal(key, -2, 2, size, dtype) * (math.sqrt(variance) / .87962566103423978)
    else:
      limit = math.sqrt(3 * variance)
      values = jax.random.uniform(key, size, dtype, -limit, limit)
    return values.reshape(shape)

  return init


def xla_kernels():
  """Context manager: layers traced inside it run XLA's own convolution and max-pool and
  Flax's BatchNorm (what XLA's cost analysis counts)."""
  return kernels.lowering("xla")


class Conv(nn.Module):
  """Drop-in for ``nn.Conv`` (same ``kernel``/``bias`` parameter names and HWIO layout).

  ``conv`` is the convolution, a function with :func:`jcv.kernels.conv2d`'s signature (like
  ``nn.Conv``'s ``conv_general_dilated``); None is ``jcv.kernels.conv2d``, which picks the
  fastest exact lowering for the backend. ``feature_group_count == in_features`` is a
  depthwise convolution.
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
  kernel_init: Callable = variance_scaling(1.0, "fan_in", "truncated_normal")  # lecun_normal
  bias_init: Callable = nn.initializers.zeros_init()
  conv: Callable | None = None

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
    conv = self.conv or kernels.conv2d
    y = conv(x, kernel, strides=self.strides, padding=self.padding,
             groups=self.feature_group_count, dilation=self.kernel_dilation)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
      y = y + bias.astype(dtype)
    return y


class ConvBNAct(nn.Module):
  """Conv + BatchNorm + activation: the course's basic block.

  ``act=None`` gives a linear (no activation) output, e.g. MobileNetV2's projection.
  ``groups=-1`` means depthwise (one group per input channel). ``bn_use_scale=False`` is a
  BN with a shift only (Keras' Inception-ResNet-v2), ``bn_scale_init=zeros`` the
  "zero-init residual" trick, ``use_bias=True`` keeps a conv bias before BN (torchvision's
  VGG-BN); ``use_bn=False`` is a plain conv with bias (AlexNet, VGG).
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
  kernel_init: Callable = variance_scaling(2.0, "fan_out", "normal")  # He, as torchvision
  bn_use_scale: bool = True  # False: BN with a shift only (Keras' Inception-ResNet-v2)
  bn_scale_init: Callable = nn.initializers.ones_init()  # zeros: "zero-init residual"
  use_bias: bool | None = None  # None: a bias only without BN (True: torchvision's VGG-BN)

  @nn.compact
  def __call__(self, x, train: bool = False):
    groups = x.shape[-1] if self.groups == -1 else self.groups
    ks = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    x = Conv(self.features, ks, strides=self.strides, padding=self.padding,
             feature_group_count=groups,
             use_bias=not self.use_bn if self.use_bias is None else self.use_bias, dtype=self.dtype,
             kernel_init=self.kernel_init, name="conv")(x)
    act = self.act
    if self.use_bn:
      fused = act if any(act is f for f in _FUSED_ACTS) else None  # BN + ReLU/ReLU6 in one pass
      x = kernels.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=self.bn_epsilon, dtype=self.dtype, use_scale=self.bn_use_scale,
                            scale_init=self.bn_scale_init, act=kernels.activation_name(fused),
                            name="bn")(x)
      act = None if fused is not None else act
    if act is not None:
      x = act(x)
    return x


# ----------------------------------------------------------------------------- pooling


def _pair(value) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else tuple(value)


def pool_output_size(size: int, window: int, stride: int, padding: int = 0, *,
                     ceil_mode: bool = False) -> int:
  """Output length of a pooling window along one axis, by PyTorch's rule (``ceil_mode`` too)."""
  span = size + 2 * padding - window
  if span < 0:
    raise ValueError(f"pooling window {window} (padding {padding}) larger than input size {size}")
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= size + padding:
    out -= 1  # the last window must start inside the input or its left padding
  return out


def _explicit_pool_padding(x, window, strides, padding, ceil_mode):
  pads = []
  for size, k, s, p in zip(x.shape[1:3], window, strides, _pair(padding)):
    out = pool_output_size(size, k, s, p, ceil_mode=ceil_mode)
    pads.append((p, p + max(0, (out - 1) * s + k - (size + 2 * p))))
  return pads


def max_pool(x, window=3, strides=2, *, padding=0, ceil_mode: bool = False):
  """Max pooling on NHWC with PyTorch semantics: int/pair ``padding`` (or 'SAME'/'VALID'), ``ceil_mode``.

  Runs :func:`jcv.kernels.max_pool` (on CPU, non-overlapping windows are a reshape + max).
  """
  window, strides = _pair(window), _pair(strides)
  if not isinstance(padding, str):
    padding = _explicit_pool_padding(x, window, strides, padding, ceil_mode)
  return kernels.max_pool(x, window, strides, padding)


def avg_pool(x, window=3, strides=1, *, padding=0, count_include_pad: bool = True):
  """Average pooling on NHWC; ``count_include_pad`` True is PyTorch's default, False is Keras' 'same'."""
  window, strides = _pair(window), _pair(strides)
  if isinstance(padding, str):
    padding = padding.upper()
  else:
    padding = [(p, p) for p in _pair(padding)]
  return nn.avg_pool(x, window, strides, padding=padding, count_include_pad=count_include_pad)


def _adaptive_pool(x, output_size, reduce):
  oh, ow = _pair(output_size)
  b, h, w, c = x.shape
  if h % oh == 0 and w % ow == 0:  # equal bins: one reshape
    return reduce(x.reshape(b, oh, h // oh, ow, w // ow, c), axis=(2, 4))
  # PyTorch's bins: [floor(i*h/n), ceil((i+1)*h/n)), never empty, even when n > h.
  rows = [((i * h) // oh, -(-((i + 1) * h) // oh)) for i in range(oh)]
  cols = [((j * w) // ow, -(-((j + 1) * w) // ow)) for j in range(ow)]
  return jnp.stack([jnp.stack([reduce(x[:, r0:r1, c0:c1], axis=(1, 2)) for c0, c1 in cols], axis=1)
                    for r0, r1 in rows], axis=1)


def adaptive_avg_pool(x, output_size):
  """``torch.nn.AdaptiveAvgPool2d`` on NHWC: any input size to ``output_size`` (int or (h, w)) bins."""
  return _adaptive_pool(x, output_size, jnp.mean)


def adaptive_max_pool(x, output_size):
  """``torch.nn.AdaptiveMaxPool2d`` on NHWC: any input size to ``output_size`` (int or (h, w)) bins."""
  return _adaptive_pool(x, output_size, jnp.max)


class SpatialPyramidPool(nn.Module):
  """SPP layer (He et al. 2014): a fixed-length vector from a feature map of any size.

  Max-pools the map into ``l x l`` bins for every level ``l`` and concatenates the flattened
  bins: output ``[B, C * sum(l * l)]``. Bins follow adaptive pooling (the paper's
  ``ceil(a/n)`` window and ``floor(a/n)`` stride, but never empty when the map is smaller
  than the level), so any input size works.
  """
  levels: Sequence[int] = (6, 3, 2, 1)
  mode: str = "max"

  @nn.compact
  def __call__(self, x):
    if self.mode not in ("max", "avg"):
      raise ValueError(f"SpatialPyramidPool mode must be 'max' or 'avg', got {self.mode!r}")
    pool = adaptive_max_pool if self.mode == "max" else adaptive_avg_pool
    return jnp.concatenate([pool(x, level).reshape(x.shape[0], -1) for level in self.levels], axis=-1)


class LocalResponseNorm(nn.Module):
  """Local response normalisation across channels (AlexNet/ZFNet): ``x / (k + alpha/n * sum x^2)^beta``.

  Same formula and defaults as ``torch.nn.LocalResponseNorm`` except ``k=2`` (the AlexNet paper).
  """
  size: int = 5
  alpha: float = 1e-4
  beta: float = 0.75
  k: float = 2.0

  @nn.compact
  def __call__(self, x):
    sq = jnp.square(x.astype(jnp.float32))
    window_sum = jax.lax.reduce_window(
        sq, 0.0, jax.lax.add, (1, 1, 1, self.size), (1, 1, 1, 1),
        ((0, 0), (0, 0), (0, 0), (self.size // 2, (self.size - 1) // 2)))
    div = jnp.power(self.k + self.alpha / self.size * window_sum, self.beta)
    return (x / div).astype(x.dtype)


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
    y = ConvBNAct(self.features, 3, padding=1, act=None, bn_scale_init=last_init, name="conv2",
                  **common)(y, train)
    return nn.relu(y + _shortcut(self, x, self.features, train, common))


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
    y = ConvBNAct(out, 1, padding=0, act=None, bn_scale_init=last_init, name="conv3", **common)(y, train)
    return nn.relu(y + _shortcut(self, x, out, train, common))


def drop_path(key, x, *, rate: float):
  """Stochastic depth / drop-connect (TF EfficientNet): zeroes whole examples of a residual branch.

  Each example of ``x`` [B, ...] is kept with probability ``1 - rate`` and then scaled by
  ``1 / (1 - rate)``, so the expectation is ``x``. Call it only in training.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"drop_path rate must be in [0, 1), got {rate!r}")
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


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


# ----------------------------------------------------------------------------- heads


def classifier_head(x, *, num_classes: int, dropout_rate: float = 0.0, train: bool = False,
                    dtype=None, name: str = "head"):
  """Global average pool, dropout, ``Dense(num_classes)`` named ``name``; float32 output.

  Call inside a compact ``__call__``. ``num_classes=0`` returns the pooled features ``[B, C]``.
  """
  x = jnp.mean(x, axis=(1, 2), dtype=jnp.float32) if x.ndim == 4 else x  # f32 sum even in bf16
  if num_classes == 0:
    return x.astype(jnp.float32)
  if dropout_rate > 0:
    x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  return nn.Dense(num_classes, dtype=dtype, name=name)(x).astype(jnp.float32)


def mlp_head(x, *, num_classes: int, hidden: Sequence[int] = (4096, 4096), dropout_rate: float = 0.5,
             train: bool = False, dtype=None, dropout_first: bool = True):
  """AlexNet/VGG classifier: flatten, [dropout, Dense, ReLU] per hidden layer, ``Dense`` ``head``.

  Layers are named ``fc6``, ``fc7``, ... and ``head``. ``num_classes=0`` returns the last hidden
  layer's activations (timm's convention for these models). ``dropout_first=False`` puts each
  dropout after its ReLU (VGG) instead of before the Dense (AlexNet).
  """
  x = x.reshape(x.shape[0], -1)
  for i, width in enumerate(hidden):
    if dropout_first and dropout_rate > 0:
      x = nn.Dropout(dropout_rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(width, dtype=dtype, name=f"fc{6 + i}")(x))
    if not dropout_first and dropout_rate > 0:
      x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  if num_classes == 0:
    return x.astype(jnp.float32)
  return nn.Dense(num_classes, dtype=dtype, name="head")(x).astype(jnp.float32)
