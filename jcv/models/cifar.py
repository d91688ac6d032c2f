"""``cifar_cnn``: a small, fast CIFAR-10 network in the style of airbench.

Architecture (Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024, after
tysam-code's hlb-CIFAR10 and Page's ResNet-9 work):

  whitening conv (2x2, VALID, bias, 2*3*2*2 = 24 channels) -> GELU
  3 x [conv3x3 -> maxpool2 -> BN -> GELU -> conv3x3 -> BN -> GELU]   widths (64, 256, 256)
  global max pool -> dense (no bias) -> x 1/9

BatchNorm has no learnable scale (only a bias), convolutions have no bias and start as
identity ("dirac") in their first ``in_channels`` filters, and the first layer is meant to be
set from data with :func:`whitening_kernel` (then frozen, see :func:`param_labels`).
``width`` scales every block (``width=0.5`` gives (32, 128, 128), about 4x fewer FLOPs).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcv import kernels
from jcv.models.layers import BatchNorm, Conv, ConvWeights, gelu, max_pool
from jcv.models.registry import ModelCard, register

__all__ = ["CifarCNN", "cifar_cnn", "dirac_init", "torch_default_init", "whitening_kernel",
           "whitening_init", "whitening_init_from_source", "set_whitening", "param_labels", "BLOCK_WIDTHS"]

BLOCK_WIDTHS = (64, 256, 256)


_TORCH_DEFAULT = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_init(key, shape, dtype=jnp.float32):
  """PyTorch's default Conv2d/Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (airbench's base)."""
  return _TORCH_DEFAULT(key, shape, dtype)


def dirac_init(key, shape, dtype=jnp.float32):
  """PyTorch-default HWIO kernel whose first ``cin`` output filters are identities."""
  kh, kw, cin, cout = shape
  w = torch_default_init(key, shape, dtype)
  n = min(cin, cout)
  eye = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, n, dtype=dtype))
  return w.at[..., :n].set(eye)


class _ConvGroup(nn.Module):
  """conv -> maxpool 2 -> BN -> GELU -> conv -> BN -> GELU."""
  features: int
  bn_momentum: float
  bn_epsilon: float
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    if not train and kernels.fusing() and not self.is_initializing():
      return self._folded(x)
    bn = lambda name: BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                epsilon=self.bn_epsilon, use_scale=False, dtype=self.dtype, name=name)
    x = Conv(self.features, (3, 3), use_bias=False, kernel_init=dirac_init, dtype=self.dtype,
             name="conv1")(x)
    x = max_pool(x, 2, 2)
    x = gelu(bn("bn1")(x))
    x = Conv(self.features, (3, 3), use_bias=False, kernel_init=dirac_init, dtype=self.dtype,
             name="conv2")(x)
    return gelu(bn("bn2")(x))

  def _folded(self, x):
    """The inference form (same variables): each BatchNorm folded into the convolution before it.
    A BatchNorm without scale is ``y * a + b`` with ``a = 1 / sqrt(var + eps) > 0``, increasing in
    each channel, so it commutes with the max-pool between ``conv1`` and ``bn1``."""
    dtype = self.dtype or jnp.result_type(x.dtype, jnp.float32)
    for i in (1, 2):
      kernel, _ = ConvWeights(self.features, (3, 3), kernel_init=dirac_init, name=f"conv{i}")(x)
      a, b = kernels.BatchNormAffine(epsilon=self.bn_epsilon, use_scale=False, name=f"bn{i}")(self.features)
      x = kernels.conv2d_bias_act(x.astype(dtype), (kernel * a).astype(dtype), b)
      x = gelu(max_pool(x, 2, 2) if i == 1 else x)
    return x


class CifarCNN(nn.Module):
  """Airbench-style CIFAR network; input normalised float NHWC (32x32), output logits."""
  num_classes: int = 10
  widths: Sequence[int] = BLOCK_WIDTHS
  whiten_kernel_size: int = 2
  bn_momentum: float = 0.6
  bn_epsilon: float = 1e-12
  logit_scale: float = 1 / 9
  dtype: Any = None
  whiten_init: Callable | None = None  # e.g. whitening_init(images); default: PyTorch's init

  @nn.compact
  def __call__(self, x, train: bool = False):
    k = self.whiten_kernel_size
    x = Conv(2 * x.shape[-1] * k * k, (k, k), padding="VALID", use_bias=True, dtype=self.dtype,
             kernel_init=self.whiten_init or torch_default_init, name="whiten")(x)
    x = gelu(x)
    for i, width in enumerate(self.widths):
      x = _ConvGroup(width, self.bn_momentum, self.bn_epsilon, self.dtype, name=f"block{i + 1}")(
          x, train)
    x = jnp.max(x, axis=(1, 2))  # the 3x3 map left after three pools
    if self.num_classes == 0:
      return x
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, kernel_init=torch_default_init,
                 name="head")(x)
    return x * self.logit_scale


@register(ModelCard(
    "cifar_cnn", paper="Jordan, 94% on CIFAR-10 in 3.29 Seconds on a Single GPU (airbench94)",
    year=2024, reference_params=1_971_640, input_size=32, default_num_classes=10,
    notes="airbench94's net; its PyTorch count 1,972,792 adds the 1,152 fixed BN weights that "
          "this port leaves out. Whitening first layer (from data via whiten_init), dirac init, "
          "BN without scale, GELU; width=0.5 gives (32, 128, 128)."))
def cifar_cnn(*, num_classes: int = 10, width: float = 1.0, widths: Sequence[int] | None = None,
              dtype=None, bn_momentum: float = 0.6, bn_epsilon: float = 1e-12,
              whiten_kernel_size: int = 2, logit_scale: float = 1 / 9,
              whiten_init: Callable | None = None) -> CifarCNN:
  """Builds :class:`CifarCNN`; ``width`` multiplies (64, 256, 256) unless ``widths`` is given."""
  if widths is None:
    if width <= 0:
      raise ValueError(f"width must be > 0, got {width}")
    widths = tuple(max(8, int(round(w * width))) for w in BLOCK_WIDTHS)
  if len(widths) != 3:
    raise ValueError(f"widths must have 3 entries (one per block), got {widths}")
  return CifarCNN(num_classes=num_classes, widths=tuple(widths), whiten_kernel_size=whiten_kernel_size,
                  bn_momentum=bn_momentum, bn_epsilon=bn_epsilon, logit_scale=logit_scale,
                  dtype=dtype, whiten_init=whiten_init)


def whitening_kernel(images, *, kernel_size: int = 2, eps: float = 5e-4) -> np.ndarray:
  """ZCA-like whitening filters from data: HWIO kernel (k, k, C, 2*C*k*k).

  ``images``: normalised float NHWC (a few thousand training images are enough). The
  filters are the eigenvectors of the k x k patch covariance scaled by
  ``1/sqrt(eigenvalue + eps)``, largest eigenvalue first, followed by their negatives, so the
  following GELU sees both signs.
  """
  x = np.asarray(images, np.float64)
  if x.ndim != 4:
    raise ValueError(f"images must be NHWC, got shape {x.shape}")
  n, h, w, c = x.shape
  k = kernel_size
  # All k x k patches, flattened in (kh, kw, c) order to match the HWIO kernel layout.
  patches = np.stack([x[:, i:h - k + 1 + i, j:w - k + 1 + j, :]
                      for i in range(k) for j in range(k)], axis=3)
  patches = patches.reshape(-1, k * k * c)
  cov = patches.T @ patches / len(patches)
  eigenvalues, eigenvectors = np.linalg.eigh(cov)
  order = np.argsort(eigenvalues)[::-1]
  filters = eigenvectors[:, order] / np.sqrt(eigenvalues[order] + eps)  # [k*k*c, k*k*c]
  kernel = filters.reshape(k, k, c, k * k * c)
  return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def whitening_init(images, *, kernel_size: int = 2, eps: float = 5e-4) -> Callable:
  """A Flax initializer returning :func:`whitening_kernel` of ``images`` (for ``whiten_init``)."""
  kernel = whitening_kernel(images, kernel_size=kernel_size, eps=eps)

  def init(key, shape, dtype=jnp.float32):
    del key
    if tuple(shape) != kernel.shape:
      raise ValueError(f"whitening kernel {kernel.shape} does not match the layer's {tuple(shape)}")
    return jnp.asarray(kernel, dtype)
  return init


def whitening_init_from_source(source, *, mean, std, num_images: int = 5000, kernel_size: int = 2,
                                eps: float = 5e-4) -> Callable:
  """:func:`whitening_init` from the first ``num_images`` of a jcv.data source.

  ``mean``/``std`` are the normalisation the train step applies (on [0, 1] images), so the
  filters whiten exactly what the model sees. In-memory sources (``source.images``) are
  sliced directly; others are read record by record.
  """
  n = min(int(num_images), len(source))
  if n < 1:
    raise ValueError("the source is empty: need at least one image to compute whitening filters")
  if hasattr(source, "images"):
    images = np.asarray(source.images[:n])
  else:
    images = np.stack([np.asarray(source[i]["image"]) for i in range(n)])
  x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return whitening_init(x, kernel_size=kernel_size, eps=eps)


def set_whitening(params, images, *, eps: float = 5e-4):
  """Returns ``params`` with ``whiten/kernel`` replaced by :func:`whitening_kernel` of ``images``."""
  kernel = params["whiten"]["kernel"]
  new = whitening_kernel(images, kernel_size=kernel.shape[0], eps=eps)
  if new.shape != kernel.shape:
    raise ValueError(f"whitening kernel {new.shape} does not match the model's {kernel.shape}")
  whiten = dict(params["whiten"], kernel=jnp.asarray(new, kernel.dtype))
  return {**params, "whiten": whiten}


def param_labels(params):
  """Parameter groups for ``optax.partition``: 'frozen' (whitening kernel), 'whiten_bias',
  'bn_bias' (BatchNorm biases, airbench trains them with a 64x learning rate) and 'default'."""
  def label(path, _):
    names = [getattr(p, "key", str(p)) for p in path]
    if names[0] == "whiten":
      return "frozen" if names[-1] == "kernel" else "whiten_bias"
    if any(n.startswith("bn") for n in names):
      return "bn_bias"
    return "default"
  return jax.tree_util.tree_map_with_path(label, params)
