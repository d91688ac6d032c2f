"""EfficientNet-Lite (Tan & Le 2019; the TF "lite" variants of 2020): ``efficientnet_lite0`` ... ``lite4``.

EfficientNet without squeeze-excitation, with ReLU6 instead of swish, and with the stem (32)
and the last conv (1280) kept fixed when the width is scaled. Layout as the TF reference and
its PyTorch ports: BN eps 1e-3, TF "SAME" padding (at any input size: ``lax`` resolves
"SAME" exactly as TF does, the extra row/column at the bottom/right), drop-connect on the
residual branches in training (rate ``drop_connect_rate * block_index / num_blocks``).
Inputs are float NHWC scaled as ``(x - 127) / 128`` on uint8 pixels
(``jcv.weights.pretrained_info(name)`` gives the mean/std; the model card the input size).

Parameter tree (names used by :mod:`jcv.weights.port` and :func:`jcv.train.build.regime_options`), the
same stage layout as ``mobilenet_v2``::

  stem/{conv,bn}, block_0/{depthwise,project}, block_{1..}/{expand,depthwise,project},
  last_conv/{conv,bn}, head (Dense)
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn

from jcv.models.layers import ConvBNAct
from jcv.models.mobilenet import STAGE_OPTIONS_DOC, InvertedResidual, StagedNet, make_divisible
from jcv.models.registry import ModelCard, register

__all__ = ["EFFICIENTNET_LITE_BLOCKS", "EFFICIENTNET_LITE_SCALING", "EfficientNetLite",
           "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "efficientnet_lite3",
           "efficientnet_lite4", "lite_blocks"]

# Base network (Lite0 = B0 without SE): (repeats, kernel, first stride, expansion, channels).
EFFICIENTNET_LITE_BLOCKS = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                            (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
# (width, depth, dropout) of TF's efficientnet_lite_builder; each model's resolution is its
# card's input_size (below).
EFFICIENTNET_LITE_SCALING = {
    "efficientnet_lite0": (1.0, 1.0, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 0.3),
    "efficientnet_lite3": (1.2, 1.4, 0.3),
    "efficientnet_lite4": (1.4, 1.8, 0.3),
}


def lite_blocks(width: float, depth: float) -> list[tuple[int, int, int, int]]:
  """One (kernel, stride, expansion, channels) per block after width/depth scaling.

  Channels are rounded to multiples of 8 (:func:`make_divisible`); repeats are rounded up,
  except in the first and last stage, which keep one block (the "lite" rule).
  """
  blocks = []
  last = len(EFFICIENTNET_LITE_BLOCKS) - 1
  for i, (repeats, kernel, stride, expansion, channels) in enumerate(EFFICIENTNET_LITE_BLOCKS):
    count = repeats if i in (0, last) else int(math.ceil(depth * repeats))
    for j in range(count):
      blocks.append((kernel, stride if j == 0 else 1, expansion, make_divisible(channels * width)))
  return blocks


class EfficientNetLite(StagedNet):
  """EfficientNet-Lite with width/depth multipliers; ``num_classes=0`` returns pooled features.

  ``drop_connect_rate``: drop-connect of block ``i`` is ``rate * i / num_blocks`` in training
  (off in frozen stages, which run in inference mode); BN-frozen stages
  (``frozen_bn_stages``) keep BatchNorm in inference mode but still drop connections.
  """
  num_classes: int = 1000
  width: float = 1.0
  depth: float = 1.0
  dropout_rate: float = 0.2
  drop_connect_rate: float = 0.2
  bn_momentum: float = 0.99
  bn_epsilon: float = 1e-3
  dtype: Any = None

  def stage_names(self) -> list[str]:
    """Top-level parameter groups from input to output (the head excluded)."""
    count = len(lite_blocks(self.width, self.depth))
    return ["stem"] + [f"block_{i}" for i in range(count)] + ["last_conv"]

  def _stage_modules(self):
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    stages = [ConvBNAct(32, 3, strides=2, act=nn.relu6, name="stem", **common)]
    blocks = lite_blocks(self.width, self.depth)
    bn_frozen = max(self.frozen_stages, self.frozen_bn_stages)
    for i, (kernel, stride, expansion, channels) in enumerate(blocks):
      stages.append(InvertedResidual(
          channels, expansion=expansion, strides=stride, kernel_size=kernel,
          drop_path_rate=self.drop_connect_rate * i / len(blocks),
          bn_frozen=i + 1 < bn_frozen, name=f"block_{i}", **common))
    stages.append(ConvBNAct(1280, 1, act=nn.relu6, name="last_conv", **common))
    return stages

  def _call_stage(self, stage, index, x, train):
    if isinstance(stage, InvertedResidual):  # BN mode set by its bn_frozen; drop-connect by train
      return stage(x, train and index >= self.frozen_stages)
    return super()._call_stage(stage, index, x, train)


EfficientNetLite.__doc__ += STAGE_OPTIONS_DOC

# Trainable parameters with the 1000-class head: Lite0-2 as the PyTorch state dicts of
# ../shared/weights/README.md; Lite3/4 our count (published rounded: 8.197M / 13.007M).
_PARAMS = {"efficientnet_lite0": 4_652_008, "efficientnet_lite1": 5_416_680,
           "efficientnet_lite2": 6_092_072, "efficientnet_lite3": 8_197_096,
           "efficientnet_lite4": 13_006_568}


def _make(name: str, input_size: int):
  width, depth, dropout = EFFICIENTNET_LITE_SCALING[name]

  def factory(*, num_classes: int = 1000, dropout_rate: float = dropout,
              drop_connect_rate: float = 0.2, bn_momentum: float = 0.99, bn_epsilon: float = 1e-3,
              dtype=None, **stage_options) -> EfficientNetLite:
    return EfficientNetLite(num_classes=num_classes, width=width, depth=depth,
                            dropout_rate=dropout_rate, drop_connect_rate=drop_connect_rate,
                            bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, dtype=dtype,
                            **stage_options)

  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = (f"EfficientNet-Lite{name[-1]}: width {width}, depth {depth}, "
                     f"{input_size} px, dropout {dropout}, drop-connect 0.2 (TF reference).")
  card = ModelCard(name, paper="Tan & Le, EfficientNet: Rethinking Model Scaling for CNNs "
                   "(Lite variants: TF 2020)", year=2019, reference_params=_PARAMS[name],
                   input_size=input_size,
                   notes=f"width {width}, depth {depth}; no SE, ReLU6, BN eps 1e-3, TF SAME "
                         "padding; inputs (x - 127) / 128; ImageNet weights via "
                         "jcv.weights.pretrained (PyTorch state dict)")
  return register(card)(factory)


efficientnet_lite0 = _make("efficientnet_lite0", input_size=224)
efficientnet_lite1 = _make("efficientnet_lite1", input_size=240)
efficientnet_lite2 = _make("efficientnet_lite2", input_size=260)
efficientnet_lite3 = _make("efficientnet_lite3", input_size=280)
efficientnet_lite4 = _make("efficientnet_lite4", input_size=300)
