"""Shared layers every model family builds on.

Convolutions (:class:`Conv`, :class:`ConvBNAct`), pooling helpers with PyTorch's
``ceil_mode`` and adaptive pooling, :class:`SpatialPyramidPool` (SPP-net),
:class:`LocalResponseNorm`, :func:`drop_path` (stochastic depth) and the classifier heads
(:func:`classifier_head`, :func:`mlp_head`). Every convolution goes through
:func:`jcv.kernels.conv2d` (unless a :class:`Conv` is given another ``conv``), every
BatchNorm is :class:`jcv.kernels.BatchNorm`. The inception and residual blocks built from
these layers are in :mod:`jcv.models.blocks`.
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
    "BatchNorm", "Conv", "ConvBNAct", "ConvWeights", "LocalResponseNorm", "SpatialPyramidPool", "adaptive_avg_pool",
    "adaptive_max_pool", "avg_pool", "classifier_head", "drop_path", "gelu", "max_pool", "mlp_head",
    "pool_output_size", "variance_scaling", "xla_kernels",
]

Dtype = Any
BatchNorm = kernels.BatchNorm  # nn.BatchNorm's variables and numbers, a fused training step on CPU
gelu = kernels.gelu  # the exact (erf) GELU, one pass forward and one backward


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
  def __call__(self, x, train: bool = False, residual=None):
    """``act(BN(conv(x)) + residual)`` (``residual`` None: no addition); folded into one
    convolution in inference mode under :func:`jcv.kernels.fused_inference`."""
    groups = x.shape[-1] if self.groups == -1 else self.groups
    ks = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    use_bias = not self.use_bn if self.use_bias is None else self.use_bias
    if self.use_bn and not train and kernels.fusing() and not self.is_initializing():
      return self._folded(x, ks, groups, use_bias, residual)
    x = Conv(self.features, ks, strides=self.strides, padding=self.padding, feature_group_count=groups,
             use_bias=use_bias, dtype=self.dtype, kernel_init=self.kernel_init, name="conv")(x)
    act = self.act
    if self.use_bn:
      fused = act if residual is None and kernels.is_fusable(act) else None  # BN + ReLU/ReLU6
      x = kernels.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                            epsilon=self.bn_epsilon, dtype=self.dtype, use_scale=self.bn_use_scale,
                            scale_init=self.bn_scale_init, act=kernels.activation_name(fused),
                            name="bn")(x)
      act = None if fused is not None else act
    if residual is not None:
      x = x + residual
    if act is not None:
      x = act(x)
    return x

  def _folded(self, x, ks, groups, use_bias, residual):
    """The inference form: BatchNorm folded into the kernel and a bias (same variables)."""
    kernel, conv_bias = ConvWeights(self.features, ks, groups, use_bias, self.kernel_init, name="conv")(x)
    a, b = kernels.BatchNormAffine(epsilon=self.bn_epsilon, use_scale=self.bn_use_scale,
                                   scale_init=self.bn_scale_init, name="bn")(self.features)
    if conv_bias is not None:
      b = b + conv_bias.astype(jnp.float32) * a
    dtype = self.dtype or jnp.result_type(x.dtype, jnp.float32)
    return kernels.conv2d_bias_act(x.astype(dtype), (kernel * a).astype(dtype), b, act=self.act,
                                   residual=residual, strides=self.strides, padding=self.padding, groups=groups)


class ConvWeights(nn.Module):
  """:class:`Conv`'s parameters (same names, shapes and initialisers) without the convolution:
  returns ``(kernel, bias or None)`` for an input like ``x``."""
  features: int
  kernel_size: tuple[int, int]
  groups: int = 1
  use_bias: bool = False
  kernel_init: Callable = variance_scaling(1.0, "fan_in", "truncated_normal")
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (x.shape[-1] // self.groups, self.features), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
            if self.use_bias else None)
    return kernel, bias


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

  Runs :func:`jcv.kernels.max_pool` (on CPU, a gradient without XLA's select-and-scatter).
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


# ----------------------------------------------------------------------------- regularisation


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
