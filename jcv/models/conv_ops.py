"""Convolution primitives used by every jcv layer.

One entry point, :func:`conv2d`, with NHWC inputs and HWIO kernels (Flax's layout).
It picks a lowering per backend: XLA's own convolution everywhere for now; CPU-specific
rewrites (1x1 as matmul, depthwise as shifted multiply-adds, im2col weight gradients)
live here too so models never need to know about them.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

__all__ = ["conv2d", "normalize_padding"]


def normalize_padding(padding, kernel_size: Sequence[int]):
  """Returns lax-style padding: 'SAME'/'VALID' or a list of (lo, hi) pairs."""
  if isinstance(padding, str):
    padding = padding.upper()
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}")
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * len(kernel_size)
  return [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]


def conv2d(x: jax.Array, kernel: jax.Array, *, strides=(1, 1), padding="SAME",
           groups: int = 1, dilation=(1, 1)) -> jax.Array:
  """2-D convolution, NHWC input, HWIO kernel of shape (kh, kw, cin // groups, cout)."""
  if isinstance(strides, int):
    strides = (strides, strides)
  if isinstance(dilation, int):
    dilation = (dilation, dilation)
  padding = normalize_padding(padding, kernel.shape[:2])
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=tuple(strides), padding=padding,
      rhs_dilation=tuple(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups)
