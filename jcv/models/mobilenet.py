"""MobileNet family: MobileNetV1 (Howard et al. 2017) and MobileNetV2 (Sandler et al. 2018).

Both follow the Keras applications layouts (same layer order, channel counts, BN epsilon,
ReLU6 and TF "SAME" padding) so the ImageNet weights in ``jcv.weights`` load into them
one array per parameter. Inputs are float NHWC images already scaled to [-1, 1].

Parameter tree of ``mobilenet_v2`` (names used by :mod:`jcv.weights.port` and by the
freezing regimes of :func:`jcv.train.build.regime_options`)::

  stem/{conv,bn}, block_0/{depthwise,project}, block_{1..16}/{expand,depthwise,project},
  last_conv/{conv,bn}, head (Dense)

Each of those top-level names is a *stage*; ``model.stage_names()`` lists them in order.
``frozen_stages=N`` makes the first N stages run BatchNorm in inference mode even when
``train=True`` (Keras' ``trainable=False`` behaviour for a frozen backbone).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcv.models.layers import ConvBNAct, drop_path
from jcv.models.registry import ModelCard, register

__all__ = [
    "InvertedResidual", "MobileNetV1", "MobileNetV2", "StagedNet", "make_divisible",
    "mobilenet_v1", "mobilenet_v2", "MOBILENET_V2_BLOCKS", "STAGE_OPTIONS_DOC",
]

# (expansion t, output channels c, repeats n, first stride s) from the MobileNetV2 paper.
MOBILENET_V2_BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                       (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
# (output channels, stride) of MobileNetV1's 13 depthwise-separable blocks.
_MOBILENET_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
                        (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds a channel count to a multiple of ``divisor`` (never more than 10% down), as Keras/TF-slim."""
  min_value = min_value or divisor
  new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


class InvertedResidual(nn.Module):
  """MobileNetV2 block: 1x1 expand (skipped when ``expansion == 1``), 3x3 depthwise, linear 1x1 project.

  Adds the input back when the stride is 1 and input/output channels match.
  ``bn_frozen=True`` runs its BatchNorms in inference mode whatever ``train`` says.
  ``kernel_size`` is the depthwise kernel (EfficientNet's MBConv uses 5 too);
  ``drop_path_rate > 0`` drops the residual branch per example in training (drop-connect,
  :func:`jcv.models.layers.drop_path`; needs a ``"dropout"`` rng).
  """
  features: int
  expansion: int = 6
  strides: int = 1
  kernel_size: int = 3
  drop_path_rate: float = 0.0
  act: Callable = nn.relu6
  bn_momentum: float = 0.999
  bn_epsilon: float = 1e-3
  bn_frozen: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn_train = train and not self.bn_frozen
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    in_features = x.shape[-1]
    y = x
    if self.expansion != 1:
      y = ConvBNAct(in_features * self.expansion, 1, act=self.act, name="expand", **common)(y, bn_train)
    y = ConvBNAct(y.shape[-1], self.kernel_size, strides=self.strides, groups=-1, act=self.act,
                  name="depthwise", **common)(y, bn_train)
    identity = self.strides == 1 and in_features == self.features
    dropped = identity and self.drop_path_rate > 0 and train
    project = ConvBNAct(self.features, 1, act=None, name="project", **common)
    if not identity or dropped:
      y = project(y, bn_train)
      return x + drop_path(self.make_rng("dropout"), y, rate=self.drop_path_rate) if dropped else y
    return project(y, bn_train, residual=x)  # BN(conv(y)) + x


class StagedNet(nn.Module):
  """Base of staged backbones: runs stages ``[start_stage, end_stage)`` and the head.

  Subclasses define the fields ``num_classes, dropout_rate, dtype``, ``stage_names()`` and
  ``_stage_modules()`` (one callable ``f(x, train)`` per stage, built inside the compact
  ``__call__``); the stage options below are shared.

  Stage ``len(stage_names())`` is the head (global average pool, dropout, Dense ``head``);
  it accepts a feature map or already pooled features [B, F].
  """
  frozen_stages: int = 0
  frozen_bn_stages: int = 0
  start_stage: int = 0
  end_stage: int | None = None

  def _stage_modules(self) -> list:
    raise NotImplementedError

  def _call_stage(self, stage, index: int, x, train: bool):
    """Runs one stage; frozen and BN-frozen stages run in inference mode."""
    return stage(x, train and index >= max(self.frozen_stages, self.frozen_bn_stages))

  @nn.compact
  def __call__(self, x, train: bool = False):
    return self._run(x, train)

  def _run(self, x, train: bool):
    stages = self._stage_modules()
    count = len(stages)
    end = count + 1 if self.end_stage is None else self.end_stage
    if not 0 <= self.start_stage <= end <= count + 1:
      raise ValueError(f"need 0 <= start_stage <= end_stage <= {count + 1}, got "
                       f"{self.start_stage} and {self.end_stage}")
    for index in range(self.start_stage, min(end, count)):
      x = self._call_stage(stages[index], index, x, train)
      if index + 1 == self.frozen_stages:
        x = jax.lax.stop_gradient(x)  # no backward pass through frozen stages at all
    if end <= count:
      return x
    if x.ndim == 4:
      x = jnp.mean(x, axis=(1, 2))
    if self.num_classes == 0:
      return x
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


# The stage options every StagedNet accepts, appended to the docstring of each staged family.
STAGE_OPTIONS_DOC = """
  Stage options (used by :func:`jcv.train.build.regime_options`; stages are ``stage_names()`` + the head):
  ``frozen_stages=N``: the first N stages run BatchNorm in inference mode and get no gradient
  (``stop_gradient`` after them, so no backward pass is computed through them);
  ``frozen_bn_stages=N``: BatchNorm only in inference mode for the first N stages;
  ``start_stage``/``end_stage``: run only stages [start, end) -- the input is then the output
  of stage ``start - 1``, the output that of stage ``end - 1`` (used to cache the frozen part).
"""


class MobileNetV2(StagedNet):
  """MobileNetV2 with width multiplier ``width``; ``num_classes=0`` returns pooled features."""
  num_classes: int = 1000
  width: float = 1.0
  dropout_rate: float = 0.0
  bn_momentum: float = 0.999
  bn_epsilon: float = 1e-3
  dtype: Any = None

  def stage_names(self) -> list[str]:
    """Top-level parameter groups from input to output (the head excluded)."""
    count = sum(n for _, _, n, _ in MOBILENET_V2_BLOCKS)
    return ["stem"] + [f"block_{i}" for i in range(count)] + ["last_conv"]

  def _stage_modules(self):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    stages = [ConvBNAct(make_divisible(32 * self.width), 3, strides=2, act=nn.relu6, name="stem",
                        **common)]
    for t, c, n, s in MOBILENET_V2_BLOCKS:
      for i in range(n):
        stages.append(InvertedResidual(make_divisible(c * self.width), expansion=t,
                                       strides=s if i == 0 else 1, name=f"block_{len(stages) - 1}",
                                       **common))
    last = make_divisible(1280 * self.width) if self.width > 1.0 else 1280
    stages.append(ConvBNAct(last, 1, act=nn.relu6, name="last_conv", **common))
    return stages


class MobileNetV1(StagedNet):
  """MobileNetV1 (Keras layout: ReLU6, BN eps 1e-3, 1x1-conv classifier as a Dense ``head``)."""
  num_classes: int = 1000
  width: float = 1.0
  dropout_rate: float = 1e-3
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = None

  def stage_names(self) -> list[str]:
    """Top-level parameter groups from input to output (the head excluded)."""
    return ["stem"] + [f"block_{i}" for i in range(len(_MOBILENET_V1_BLOCKS))]

  def _stage_modules(self):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    stages = [ConvBNAct(int(32 * self.width), 3, strides=2, act=nn.relu6, name="stem", **common)]
    for i, (c, s) in enumerate(_MOBILENET_V1_BLOCKS):
      stages.append(_SeparableBlock(int(c * self.width), strides=s, name=f"block_{i}", **common))
    return stages


MobileNetV2.__doc__ += STAGE_OPTIONS_DOC
MobileNetV1.__doc__ += STAGE_OPTIONS_DOC


class _SeparableBlock(nn.Module):
  """MobileNetV1 block: 3x3 depthwise + BN + ReLU6, then 1x1 pointwise + BN + ReLU6."""
  features: int
  strides: int = 1
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  bn_frozen: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    bn_train = train and not self.bn_frozen
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                  act=nn.relu6)
    x = ConvBNAct(x.shape[-1], 3, strides=self.strides, groups=-1, name="depthwise", **common)(x, bn_train)
    return ConvBNAct(self.features, 1, name="pointwise", **common)(x, bn_train)


_STAGE_OPTIONS = ("frozen_stages", "frozen_bn_stages", "start_stage", "end_stage")


def _stage_options(options: dict) -> dict:
  unknown = set(options) - set(_STAGE_OPTIONS)
  if unknown:
    raise ValueError(f"unknown MobileNet option(s) {sorted(unknown)}; expected width, dropout_rate, "
                     f"bn_momentum, bn_epsilon, dtype or one of {_STAGE_OPTIONS}")
  return options


def _check_width(width: float):
  if not width > 0:
    raise ValueError(f"width multiplier must be > 0, got {width!r}")


@register(ModelCard(
    "mobilenet_v2", paper="Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    year=2018, reference_params=3_504_872, input_size=224,
    notes="width 1.0; BN eps 1e-3, ReLU6, TF SAME padding; inputs in [-1, 1]; "
          "ImageNet weights via jcv.weights.pretrained"))
def mobilenet_v2(*, num_classes: int = 1000, width: float = 1.0, dropout_rate: float = 0.0,
                 bn_momentum: float = 0.999, bn_epsilon: float = 1e-3, dtype=None, **stage_options) -> MobileNetV2:
  """MobileNetV2 (Keras/TF-slim layout). ``width`` is the width multiplier (0.35 ... 1.4)."""
  _check_width(width)
  return MobileNetV2(num_classes=num_classes, width=width, dropout_rate=dropout_rate,
                     bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                     dtype=dtype, **_stage_options(stage_options))


@register(ModelCard(
    "mobilenet_v1", paper="Howard et al., MobileNets: Efficient Convolutional Neural Networks "
    "for Mobile Vision Applications", year=2017, reference_params=4_231_976, input_size=224,
    notes="width 1.0, Keras layout (ReLU6, BN eps 1e-3, dropout 1e-3 before the classifier)"))
def mobilenet_v1(*, num_classes: int = 1000, width: float = 1.0, dropout_rate: float = 1e-3,
                 bn_momentum: float = 0.99, bn_epsilon: float = 1e-3, dtype=None, **stage_options) -> MobileNetV1:
  """MobileNetV1 (Keras layout). ``width`` is the width multiplier alpha (0.25 ... 1.0)."""
  _check_width(width)
  return MobileNetV1(num_classes=num_classes, width=width, dropout_rate=dropout_rate,
                     bn_momentum=bn_momentum, bn_epsilon=bn_epsilon,
                     dtype=dtype, **_stage_options(stage_options))
