"""Convolution geometry shared by the kernels: padding, output sizes, shifted windows.

Layouts are NHWC activations and HWIO kernels; ``pads`` are explicit ``(lo, hi)`` pairs per
spatial dimension, SAME/VALID resolved exactly as ``lax`` does.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jax import lax

__all__ = ["DIMS", "acc_dtype", "explicit_pads", "normalize_padding", "out_hw", "out_size",
           "pad_hw", "pair", "taps"]

DIMS = ("NHWC", "HWIO", "NHWC")


def normalize_padding(padding, kernel_size: Sequence[int]):
  """Returns lax-style padding: 'SAME'/'VALID' or a list of (lo, hi) pairs."""
  if isinstance(padding, str):
    padding = padding.upper()
    if padding not in ("SAME", "VALID"):
      raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}")
    return padding
  if isinstance(padding, int):
    return [(padding, padding)] * len(kernel_size)
  pairs = [tuple(p) if not isinstance(p, int) else (p, p) for p in padding]
  if len(pairs) != len(kernel_size) or any(len(p) != 2 for p in pairs):
    raise ValueError(f"explicit padding must be {len(kernel_size)} (lo, hi) pairs, got {padding!r}")
  return [(int(lo), int(hi)) for lo, hi in pairs]


def pair(value, what: str) -> tuple[int, int]:
  """An int or a pair of ints as a pair (ValueError naming ``what`` otherwise)."""
  if isinstance(value, int):
    return (value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
  return value


def explicit_pads(in_hw, k_hw, strides, dilation, padding):
  """(lo, hi) pads per spatial dim, SAME/VALID resolved exactly as lax does."""
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(k_hw, dilation)]
    return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, window, strides, padding))
  return tuple(tuple(p) for p in padding)


def out_size(size, k, stride, dil, pad):
  """Output length along one axis."""
  return (size + pad[0] + pad[1] - (k - 1) * dil - 1) // stride + 1


def out_hw(x_shape, kernel_shape, strides, pads, dilation) -> tuple[int, int]:
  """Output (height, width) of an NHWC input and HWIO kernel."""
  return (out_size(x_shape[1], kernel_shape[0], strides[0], dilation[0], pads[0]),
          out_size(x_shape[2], kernel_shape[1], strides[1], dilation[1], pads[1]))


def pad_hw(x, pads):
  """Zero-pads the spatial dims of NHWC ``x``."""
  if all(lo == 0 and hi == 0 for lo, hi in pads):
    return x
  zero = jnp.zeros((), x.dtype)
  return lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def taps(xp, k_hw, hw_out, strides, dilation):
  """The kh*kw shifted (strided) windows of the padded input, in HW order."""
  n, _, _, c = xp.shape
  (ho, wo), (sh, sw), (dh, dw) = hw_out, strides, dilation
  for i in range(k_hw[0]):
    for j in range(k_hw[1]):
      start = (0, i * dh, j * dw, 0)
      limit = (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c)
      yield lax.slice(xp, start, limit, (1, sh, sw, 1))


def acc_dtype(dtype):
  """float32 accumulation for 16-bit types, else the type itself."""
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype
