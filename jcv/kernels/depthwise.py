"""Depthwise convolutions (``groups == in_channels``, any channel multiplier) as shifted
multiply-adds that XLA fuses into one loop, forward and backward.

bfloat16 inputs are computed with float32 accumulation and rounded once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jcv.kernels.geometry import acc_dtype, out_hw, pad_hw, taps

__all__ = ["depthwise"]

# Bytes of one tap's window per iteration of the blocked kernel-gradient loop: all kh*kw
# windows of a block then stay in a core's L2 cache (64-128 KiB measured best on a 2 MiB L2).
_DW_BLOCK_BYTES = 128 << 10


def _depthwise_forward(x, kernel, strides, pads, dilation):
  kh, kw, _, cout = kernel.shape
  mult = cout // x.shape[-1]
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  acc = acc_dtype(out_dtype)
  hw_out = out_hw(x.shape, kernel.shape, strides, pads, dilation)
  xp = pad_hw(x, pads)
  if mult > 1:  # output channel c * mult + m reads input channel c
    xp = jnp.repeat(xp, mult, axis=-1)
  k = kernel.reshape(kh * kw, cout).astype(acc)
  y = None
  for t, window in enumerate(taps(xp, (kh, kw), hw_out, strides, dilation)):
    term = window.astype(acc) * k[t]
    y = term if y is None else y + term
  return y.astype(out_dtype)


def _largest_divisor_at_most(n, limit):
  limit = max(1, min(n, int(limit)))
  return next(d for d in range(limit, 0, -1) if n % d == 0)


def _depthwise_kernel_grad(x, g, kernel_shape, strides, pads, dilation):
  """dL/dkernel of a depthwise conv: per-tap sums of window * g over batch and space.

  XLA:CPU would materialise every shifted window of the whole batch before reducing it; this
  loops (``lax.scan``) over blocks of images and output rows small enough to stay in cache.
  """
  kh, kw, _, cout = kernel_shape
  n, ho, wo, _ = g.shape
  mult = cout // x.shape[-1]
  acc = acc_dtype(jnp.result_type(x.dtype, g.dtype))
  xp = pad_hw(x, pads)
  if mult > 1:
    xp = jnp.repeat(xp, mult, axis=-1)
  row_bytes = wo * cout * 4
  rows = _largest_divisor_at_most(ho, _DW_BLOCK_BYTES // row_bytes)
  images = _largest_divisor_at_most(n, _DW_BLOCK_BYTES // (rows * row_bytes))
  in_rows = (rows - 1) * strides[0] + (kh - 1) * dilation[0] + 1
  row_blocks = ho // rows

  def block_grad(b):
    n0 = (b // row_blocks) * images
    r0 = (b % row_blocks) * rows
    xb = lax.dynamic_slice(xp, (n0, r0 * strides[0], 0, 0), (images, in_rows) + xp.shape[2:])
    gb = lax.dynamic_slice(g, (n0, r0, 0, 0), (images, rows, wo, cout)).astype(acc)
    return jnp.stack([jnp.sum(w.astype(acc) * gb, axis=(0, 1, 2))
                      for w in taps(xb, (kh, kw), (rows, wo), strides, dilation)])

  blocks = (n // images) * row_blocks
  if blocks == 1:
    dk = block_grad(0)
  else:
    dk, _ = lax.scan(lambda total, b: (total + block_grad(b), None),
                     jnp.zeros((kh * kw, cout), acc), jnp.arange(blocks))
  return dk.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def depthwise(x, kernel, strides, pads, dilation):
  """Depthwise conv of NHWC ``x`` with an HWIO kernel of shape (kh, kw, 1, cin * mult)."""
  return _depthwise_forward(x, kernel, strides, pads, dilation)


def _depthwise_fwd(x, kernel, strides, pads, dilation):
  return _depthwise_forward(x, kernel, strides, pads, dilation), (x, kernel)


def _depthwise_bwd(strides, pads, dilation, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _depthwise_forward(x_, kernel, strides, pads, dilation), x)
  (dx,) = input_vjp(g)
  dk = _depthwise_kernel_grad(x, g, kernel.shape, strides, pads, dilation)
  return dx, dk.astype(kernel.dtype)


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)
