"""PyTorch definitions of the benchmarked jcv architectures, layer for layer, without torchvision.

Each builder returns an ``nn.Module`` whose *trainable* parameter count equals jcv's
``params`` count for the same name and ``num_classes`` (``benchmarks/throughput.py`` checks it
and reports a mismatch). Layouts follow torchvision (ResNet v1.5, VGG, Inception-v3 without
the auxiliary head) and Keras (MobileNetV2: BN eps 1e-3, ReLU6); the CIFAR network follows
``jcv.models.cifar`` (airbench style: whitening conv, BN without scale, exact erf GELU).

Padding: jcv's MobileNetV2 uses TF "SAME" padding, which at stride 2 on even sizes pads
(0, 1); here it is PyTorch's symmetric (1, 1): same output size, same FLOPs.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["BUILDERS", "build", "trainable_params"]


def trainable_params(model: nn.Module) -> int:
  """Number of parameters with ``requires_grad`` (jcv's ``params`` collection)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _conv_bn(cin, cout, k, stride=1, padding=None, groups=1, eps=1e-5, act=nn.ReLU):
  padding = k // 2 if padding is None else padding
  layers = [nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=eps)]
  if act is not None:
    layers.append(act(inplace=True))
  return nn.Sequential(*layers)


# --- CIFAR CNN (jcv.models.cifar) -----------------------------------------------------------

class _CifarGroup(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout, eps=1e-12, momentum=0.4)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout, eps=1e-12, momentum=0.4)
    for bn in (self.bn1, self.bn2):
      bn.weight.requires_grad_(False)  # jcv: BatchNorm(use_scale=False)
    self.pool = nn.MaxPool2d(2)
    self.act = nn.GELU()

  def forward(self, x):
    x = self.act(self.bn1(self.pool(self.conv1(x))))
    return self.act(self.bn2(self.conv2(x)))


class CifarCNN(nn.Module):
  """airbench-style network, widths (64, 256, 256) at ``width=1``."""

  def __init__(self, num_classes=10, widths=(64, 256, 256)):
    super().__init__()
    self.whiten = nn.Conv2d(3, 24, 2, padding=0, bias=True)
    self.act = nn.GELU()
    chans = (24,) + tuple(widths)
    self.blocks = nn.Sequential(*[_CifarGroup(chans[i], chans[i + 1]) for i in range(3)])
    self.head = nn.Linear(widths[-1], num_classes, bias=False)

  def forward(self, x):
    x = self.blocks(self.act(self.whiten(x)))
    x = torch.amax(x, dim=(2, 3))
    return self.head(x) / 9


# --- ResNet (torchvision layout, v1.5) ------------------------------------------------------

class _Basic(nn.Module):
  expansion = 1

  def __init__(self, cin, width, stride):
    super().__init__()
    self.body = nn.Sequential(_conv_bn(cin, width, 3, stride), _conv_bn(width, width, 3, act=None))
    self.short = (_conv_bn(cin, width, 1, stride, 0, act=None)
                  if stride != 1 or cin != width else nn.Identity())

  def forward(self, x):
    return torch.relu(self.body(x) + self.short(x))


class _Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin, width, stride):
    super().__init__()
    out = width * 4
    self.body = nn.Sequential(_conv_bn(cin, width, 1, padding=0), _conv_bn(width, width, 3, stride),
                              _conv_bn(width, out, 1, padding=0, act=None))
    self.short = (_conv_bn(cin, out, 1, stride, 0, act=None)
                  if stride != 1 or cin != out else nn.Identity())

  def forward(self, x):
    return torch.relu(self.body(x) + self.short(x))


class ResNet(nn.Module):
  """ImageNet ResNet: 7x7/2 stem, 3x3/2 max pool, four stages, average pool, fc."""

  def __init__(self, block, sizes, num_classes=1000):
    super().__init__()
    layers = [_conv_bn(3, 64, 7, 2, 3), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for s, (size, width) in enumerate(zip(sizes, (64, 128, 256, 512))):
      for i in range(size):
        layers.append(block(cin, width, 2 if s > 0 and i == 0 else 1))
        cin = width * block.expansion
    self.features = nn.Sequential(*layers)
    self.fc = nn.Linear(cin, num_classes)

  def forward(self, x):
    return self.fc(torch.mean(self.features(x), dim=(2, 3)))


# --- MobileNetV2 (Keras layout) -------------------------------------------------------------

def _divisible(v, d=8):
  new = max(d, int(v + d / 2) // d * d)
  return new + d if new < 0.9 * v else new


class _InvertedResidual(nn.Module):
  def __init__(self, cin, cout, expansion, stride):
    super().__init__()
    hidden = cin * expansion
    layers = []
    if expansion != 1:
      layers.append(_conv_bn(cin, hidden, 1, padding=0, eps=1e-3, act=nn.ReLU6))
    layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden, eps=1e-3, act=nn.ReLU6),
               _conv_bn(hidden, cout, 1, padding=0, eps=1e-3, act=None)]
    self.body = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x):
    y = self.body(x)
    return x + y if self.residual else y


class MobileNetV2(nn.Module):
  """MobileNetV2 width 1.0: stem, 17 inverted residuals, 1x1 conv to 1280, pool, fc."""
  BLOCKS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
            (6, 160, 3, 2), (6, 320, 1, 1))

  def __init__(self, num_classes=1000, width=1.0):
    super().__init__()
    cin = _divisible(32 * width)
    layers = [_conv_bn(3, cin, 3, 2, eps=1e-3, act=nn.ReLU6)]
    for t, c, n, s in self.BLOCKS:
      for i in range(n):
        cout = _divisible(c * width)
        layers.append(_InvertedResidual(cin, cout, t, s if i == 0 else 1))
        cin = cout
    last = _divisible(1280 * width) if width > 1.0 else 1280
    layers.append(_conv_bn(cin, last, 1, padding=0, eps=1e-3, act=nn.ReLU6))
    self.features = nn.Sequential(*layers)
    self.head = nn.Linear(last, num_classes)

  def forward(self, x):
    return self.head(torch.mean(self.features(x), dim=(2, 3)))


# --- VGG-16 (torchvision) -------------------------------------------------------------------

class VGG16(nn.Module):
  """Configuration D: 13 3x3 convs with bias, 5 max pools, adaptive 7x7 pool, 4096-4096 head."""
  CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")

  def __init__(self, num_classes=1000):
    super().__init__()
    layers, cin = [], 3
    for v in self.CONFIG:
      if v == "M":
        layers.append(nn.MaxPool2d(2, 2))
      else:
        layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
        cin = v
    self.features = nn.Sequential(*layers)
    self.pool = nn.AdaptiveAvgPool2d(7)
    self.classifier = nn.Sequential(
        nn.Linear(512 * 49, 4096), nn.ReLU(True), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(4096, num_classes))

  def forward(self, x):
    return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# --- Inception-v3 (torchvision, no aux head) ------------------------------------------------

def _c(cin, cout, k, stride=1, padding=0):
  return _conv_bn(cin, cout, k, stride, padding, eps=1e-3)


class _Branches(nn.Module):
  def __init__(self, *branches):
    super().__init__()
    self.branches = nn.ModuleList(branches)

  def forward(self, x):
    return torch.cat([b(x) for b in self.branches], 1)


def _avg_branch(cin, cout):
  return nn.Sequential(nn.AvgPool2d(3, 1, 1), _c(cin, cout, 1))


def _inception_a(cin, pool):
  return _Branches(_c(cin, 64, 1),
                   nn.Sequential(_c(cin, 48, 1), _c(48, 64, 5, padding=2)),
                   nn.Sequential(_c(cin, 64, 1), _c(64, 96, 3, padding=1), _c(96, 96, 3, padding=1)),
                   _avg_branch(cin, pool))


def _inception_b(cin):
  return _Branches(_c(cin, 384, 3, 2),
                   nn.Sequential(_c(cin, 64, 1), _c(64, 96, 3, padding=1), _c(96, 96, 3, 2)),
                   nn.MaxPool2d(3, 2))


def _inception_c(cin, c7):
  return _Branches(
      _c(cin, 192, 1),
      nn.Sequential(_c(cin, c7, 1), _c(c7, c7, (1, 7), padding=(0, 3)), _c(c7, 192, (7, 1), padding=(3, 0))),
      nn.Sequential(_c(cin, c7, 1), _c(c7, c7, (7, 1), padding=(3, 0)), _c(c7, c7, (1, 7), padding=(0, 3)),
                    _c(c7, c7, (7, 1), padding=(3, 0)), _c(c7, 192, (1, 7), padding=(0, 3))),
      _avg_branch(cin, 192))


def _inception_d(cin):
  return _Branches(
      nn.Sequential(_c(cin, 192, 1), _c(192, 320, 3, 2)),
      nn.Sequential(_c(cin, 192, 1), _c(192, 192, (1, 7), padding=(0, 3)),
                    _c(192, 192, (7, 1), padding=(3, 0)), _c(192, 192, 3, 2)),
      nn.MaxPool2d(3, 2))


class _InceptionE(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.b1 = _c(cin, 320, 1)
    self.b3 = _c(cin, 384, 1)
    self.b3a, self.b3b = _c(384, 384, (1, 3), padding=(0, 1)), _c(384, 384, (3, 1), padding=(1, 0))
    self.bd = nn.Sequential(_c(cin, 448, 1), _c(448, 384, 3, padding=1))
    self.bda, self.bdb = _c(384, 384, (1, 3), padding=(0, 1)), _c(384, 384, (3, 1), padding=(1, 0))
    self.bp = _avg_branch(cin, 192)

  def forward(self, x):
    b3, bd = self.b3(x), self.bd(x)
    return torch.cat([self.b1(x), self.b3a(b3), self.b3b(b3), self.bda(bd), self.bdb(bd),
                      self.bp(x)], 1)


class InceptionV3(nn.Module):
  """torchvision Inception-v3 (BN eps 1e-3), without the auxiliary classifier."""

  def __init__(self, num_classes=1000):
    super().__init__()
    self.features = nn.Sequential(
        _c(3, 32, 3, 2), _c(32, 32, 3), _c(32, 64, 3, padding=1), nn.MaxPool2d(3, 2),
        _c(64, 80, 1), _c(80, 192, 3), nn.MaxPool2d(3, 2),
        _inception_a(192, 32), _inception_a(256, 64), _inception_a(288, 64), _inception_b(288),
        _inception_c(768, 128), _inception_c(768, 160), _inception_c(768, 160), _inception_c(768, 192),
        _inception_d(768), _InceptionE(1280), _InceptionE(2048))
    self.fc = nn.Linear(2048, num_classes)

  def forward(self, x):
    return self.fc(torch.mean(self.features(x), dim=(2, 3)))


BUILDERS = {
    "cifar_cnn": lambda num_classes: CifarCNN(num_classes),
    "resnet18": lambda num_classes: ResNet(_Basic, (2, 2, 2, 2), num_classes),
    "resnet34": lambda num_classes: ResNet(_Basic, (3, 4, 6, 3), num_classes),
    "resnet50": lambda num_classes: ResNet(_Bottleneck, (3, 4, 6, 3), num_classes),
    "resnet101": lambda num_classes: ResNet(_Bottleneck, (3, 4, 23, 3), num_classes),
    "mobilenet_v2": lambda num_classes: MobileNetV2(num_classes),
    "vgg16": lambda num_classes: VGG16(num_classes),
    "inception_v3": lambda num_classes: InceptionV3(num_classes),
}


def build(name: str, *, num_classes: int) -> nn.Module:
  """The PyTorch twin of jcv model ``name``; KeyError lists the names available."""
  if name not in BUILDERS:
    raise KeyError(f"no PyTorch peer for {name!r}; available: {', '.join(sorted(BUILDERS))}")
  return BUILDERS[name](num_classes)
