"""ResNets (He et al. 2015): the ImageNet family (torchvision layout, v1.5 bottlenecks) and the
CIFAR ResNets of the paper's section 4.2 (3x3 stem, 16-32-64 widths, parameter-free "option A"
shortcuts).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn

from jcv.models.blocks import BasicBlock, Bottleneck
from jcv.models.layers import ConvBNAct, classifier_head, max_pool
from jcv.models.registry import ModelCard, register

__all__ = ["ResNet", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet20",
           "resnet56"]

_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """A ResNet of ``stage_sizes`` blocks (``block``: ``'basic'`` or ``'bottleneck'``) per stage.

  ``stem='imagenet'`` is the 7x7/2 conv + 3x3/2 max pool; ``stem='cifar'`` a single 3x3 conv.
  Stages after the first halve the resolution. ``zero_init_residual`` starts every block as
  the identity (the last BN scale at zero).
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = "basic"
  widths: Sequence[int] = (64, 128, 256, 512)
  stem: str = "imagenet"
  shortcut: str = "projection"
  num_classes: int = 1000
  dropout_rate: float = 0.0
  zero_init_residual: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.block not in _BLOCKS:
      raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {self.block!r}")
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon, dtype=self.dtype)
    if self.stem == "imagenet":
      x = ConvBNAct(self.widths[0], 7, strides=2, padding=3, name="stem", **common)(x, train)
      x = max_pool(x, 3, 2, padding=1)
    elif self.stem == "cifar":
      x = ConvBNAct(self.widths[0], 3, padding=1, name="stem", **common)(x, train)
    else:
      raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
    block = _BLOCKS[self.block]
    for s, (size, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for i in range(size):
        x = block(width, strides=2 if s > 0 and i == 0 else 1, shortcut=self.shortcut,
                  zero_init_residual=self.zero_init_residual, name=f"stage{s + 1}_block{i + 1}",
                  **common)(x, train)
    return classifier_head(x, num_classes=self.num_classes, dropout_rate=self.dropout_rate,
                           train=train, dtype=self.dtype)


_PAPER = "He, Zhang, Ren, Sun. Deep Residual Learning for Image Recognition"


def _imagenet(name, stage_sizes, block, params):
  @register(ModelCard(name, paper=_PAPER + " (torchvision layout)", year=2015,
                      reference_params=params, input_size=224))
  def factory(*, num_classes: int = 1000, **options) -> ResNet:
    return ResNet(stage_sizes, block, num_classes=num_classes, **options)
  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = (f"{name}: {block} blocks {stage_sizes}. Options: ``dropout_rate``, "
                     "``zero_init_residual``, ``dtype``, ``bn_momentum``, ``bn_epsilon``.")
  factory.__module__ = __name__
  return factory


def _cifar(name, n, params):
  @register(ModelCard(name, paper=_PAPER + f" (CIFAR-10 ResNet, n={n}, option A shortcuts)",
                      year=2015, reference_params=params, input_size=32, default_num_classes=10,
                      notes="Paper: 0.27M (resnet20) / 0.85M (resnet56); count at 10 classes."))
  def factory(*, num_classes: int = 10, **options) -> ResNet:
    options = {"shortcut": "zero_pad", **options}
    return ResNet((n, n, n), "basic", (16, 32, 64), "cifar", num_classes=num_classes, **options)
  factory.__name__ = factory.__qualname__ = name
  factory.__doc__ = (f"{name}: CIFAR ResNet with 3 stages of {n} basic blocks (16, 32, 64 wide). "
                     "Options: ``shortcut`` ('zero_pad' or 'projection'), ``dropout_rate``, "
                     "``zero_init_residual``, ``dtype``, ``bn_momentum``, ``bn_epsilon``.")
  factory.__module__ = __name__
  return factory


resnet18 = _imagenet("resnet18", (2, 2, 2, 2), "basic", 11_689_512)
resnet34 = _imagenet("resnet34", (3, 4, 6, 3), "basic", 21_797_672)
resnet50 = _imagenet("resnet50", (3, 4, 6, 3), "bottleneck", 25_557_032)
resnet101 = _imagenet("resnet101", (3, 4, 23, 3), "bottleneck", 44_549_160)
resnet152 = _imagenet("resnet152", (3, 8, 36, 3), "bottleneck", 60_192_808)
resnet20 = _cifar("resnet20", 3, 269_722)
resnet56 = _cifar("resnet56", 9, 853_018)
