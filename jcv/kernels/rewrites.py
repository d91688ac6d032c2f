"""Exact jnp rewrites of convolutions that XLA:CPU (one core per convolution) runs slowly.

Each computes ``lax.conv_general_dilated`` (NHWC, HWIO, explicit ``(lo, hi)`` pads) as matrix
multiplies, which use every core; :func:`jcv.kernels.dispatch.conv2d` picks one per layer:

* :func:`conv_1x1`: a strided slice and a matrix multiply;
* :func:`conv_small_map`: maps with fewer pixels than kernel taps, one matrix multiply with the
  kernel unrolled over the whole map (taps that only see padding drop out);
* :func:`conv_im2col`: im2col + one matrix multiply, forward and backward;
* :func:`conv_im2col_grad`: XLA's forward convolution, im2col + matmul kernel gradient.

bfloat16 inputs are computed with float32 accumulation and rounded once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jcv.kernels.geometry import DIMS, acc_dtype, out_hw, out_size, pad_hw, taps

__all__ = ["conv_1x1", "conv_im2col", "conv_im2col_grad", "conv_small_map", "xla_conv"]


def xla_conv(x, kernel, strides, padding, groups, dilation):
  """XLA's own convolution."""
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=DIMS, feature_group_count=groups)


# --- 1x1: slice + matmul ------------------------------------------------------------------

def conv_1x1(x, kernel, strides, pads):
  """A 1x1 convolution (any stride) as a strided slice and one matrix multiply."""
  xp = pad_hw(x, pads)
  n, h, w, cin = xp.shape
  ho, wo = (h - 1) // strides[0] + 1, (w - 1) // strides[1] + 1
  if strides != (1, 1):
    xp = lax.slice(xp, (0, 0, 0, 0), (n, (ho - 1) * strides[0] + 1, (wo - 1) * strides[1] + 1, cin),
                   (1, strides[0], strides[1], 1))
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  y = lax.dot_general(xp.reshape(n * ho * wo, cin), kernel.reshape(cin, -1),
                      (((1,), (0,)), ((), ())), preferred_element_type=acc_dtype(out_dtype))
  return y.astype(out_dtype).reshape(n, ho, wo, -1)


# --- maps smaller than the kernel: one matmul with the kernel unrolled over the map --------

def _small_map_links(in_hw, k_hw, strides, pads, dilation):
  """``links[a, b, u, v]``: the kernel tap (i, j) linking input pixel (a, b) to output pixel
  (u, v), or None; and the output size."""
  hw_out = tuple(out_size(in_hw[d], k_hw[d], strides[d], dilation[d], pads[d]) for d in (0, 1))

  def tap(pixel, out, d):
    i, rem = divmod(pixel + pads[d][0] - out * strides[d], dilation[d])
    return i if rem == 0 and 0 <= i < k_hw[d] else None

  links = {}
  for a in range(in_hw[0]):
    for b in range(in_hw[1]):
      for u in range(hw_out[0]):
        for v in range(hw_out[1]):
          i, j = tap(a, u, 0), tap(b, v, 1)
          links[a, b, u, v] = None if i is None or j is None else (i, j)
  return links, hw_out


def _unrolled_kernel(kernel, links, in_hw, hw_out):
  """The conv as a (h*w*cin, ho*wo*cout) matrix: block ((a, b), (u, v)) is the tap
  ``links[a, b, u, v]`` (:func:`_small_map_links`), or zeros. Built row by row (no transposes)."""
  _, _, cin, cout = kernel.shape
  ho, wo = hw_out
  zero = jnp.zeros((cin, cout), kernel.dtype)
  rows = []
  for a in range(in_hw[0]):
    for b in range(in_hw[1]):
      blocks = [zero if links[a, b, u, v] is None else kernel[links[a, b, u, v]]
                for u in range(ho) for v in range(wo)]
      rows.append(jnp.concatenate(blocks, axis=1))
  return jnp.concatenate(rows, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_small_map(x, kernel, strides, pads, dilation):
  """One matmul with the kernel unrolled over the whole map (:func:`_unrolled_kernel`).

  On a map with fewer pixels than kernel taps this multiplies fewer zeros than im2col (whose
  patches hold the padding) and copies no patches; taps that only see padding drop out (a
  3x3 SAME conv on a 1x1 map is its centre tap). Input gradient: the transposed matmul.
  Kernel gradient: im2col + one matmul over the taps that meet the map, written in HWIO order
  (autodiff through the unrolled kernel would sum its blocks back with slow strided pads).
  """
  n, h, w, _ = x.shape
  links, (ho, wo) = _small_map_links((h, w), kernel.shape[:2], strides, pads, dilation)
  unrolled = _unrolled_kernel(kernel, links, (h, w), (ho, wo))
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  y = lax.dot_general(x.reshape(n, -1), unrolled, (((1,), (0,)), ((), ())),
                      preferred_element_type=acc_dtype(out_dtype))
  return y.astype(out_dtype).reshape(n, ho, wo, kernel.shape[-1])


def _conv_small_map_fwd(x, kernel, strides, pads, dilation):
  return conv_small_map(x, kernel, strides, pads, dilation), (x, kernel)


def _conv_small_map_bwd(strides, pads, dilation, residuals, g):
  x, kernel = residuals
  n, h, w, cin = x.shape
  kh, kw, _, cout = kernel.shape
  acc = acc_dtype(jnp.result_type(x.dtype, g.dtype))
  links, hw_out = _small_map_links((h, w), (kh, kw), strides, pads, dilation)
  unrolled = _unrolled_kernel(kernel, links, (h, w), hw_out)
  dx = lax.dot_general(g.reshape(n, -1), unrolled, (((1,), (1,)), ((), ())),
                       preferred_element_type=acc).astype(x.dtype).reshape(x.shape)
  live = sorted({t for t in links.values() if t is not None})
  if not live:  # every output sees only padding
    return dx, jnp.zeros_like(kernel)
  windows = dict(zip([(i, j) for i in range(kh) for j in range(kw)],
                     taps(pad_hw(x, pads), (kh, kw), hw_out, strides, dilation)))
  patches = jnp.concatenate([windows[t] for t in live], axis=-1)
  dk_live = lax.dot_general(patches.reshape(-1, len(live) * cin), g.reshape(-1, cout),
                            (((0,), (0,)), ((), ())), preferred_element_type=acc)
  dk_live = dk_live.astype(kernel.dtype).reshape(len(live), cin, cout)
  if len(live) == kh * kw:
    return dx, dk_live.reshape(kernel.shape)
  (i0, j0), (i1, j1) = live[0], live[-1]
  if live == [(i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]:
    # a block of taps: a pad, which XLA fuses into the gradient's readers (no zero taps written)
    block = dk_live.reshape(i1 - i0 + 1, j1 - j0 + 1, cin, cout)
    return dx, lax.pad(block, jnp.zeros((), kernel.dtype),
                       ((i0, kh - 1 - i1, 0), (j0, kw - 1 - j1, 0), (0, 0, 0), (0, 0, 0)))
  position = {t: k for k, t in enumerate(live)}
  zero = jnp.zeros((cin, cout), kernel.dtype)
  per_tap = [dk_live[position[i, j]] if (i, j) in position else zero for i in range(kh) for j in range(kw)]
  return dx, jnp.stack(per_tap).reshape(kernel.shape)


conv_small_map.defvjp(_conv_small_map_fwd, _conv_small_map_bwd)


# --- general conv: im2col + matmul --------------------------------------------------------

def _im2col(x, k_hw, strides, pads, dilation):
  """Patches [N, Ho, Wo, kh*kw*C], ordered like an HWIO kernel reshaped to (kh*kw*C, O)."""
  hw_out = out_hw(x.shape, k_hw, strides, pads, dilation)
  windows = list(taps(pad_hw(x, pads), k_hw, hw_out, strides, dilation))
  return windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)


def conv_im2col(x, kernel, strides, pads, dilation):
  """im2col + one matrix multiply (autodiff gives matmul gradients too).

  XLA:CPU's convolution is slow on tiny feature maps with many channels (2x2x256: 14x the
  CPU time of this), and matmuls use every core.
  """
  kh, kw, cin, cout = kernel.shape
  patches = _im2col(x, (kh, kw), strides, pads, dilation)
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  y = lax.dot_general(patches.reshape(-1, kh * kw * cin), kernel.reshape(kh * kw * cin, cout),
                      (((1,), (0,)), ((), ())), preferred_element_type=acc_dtype(out_dtype))
  return y.astype(out_dtype).reshape(patches.shape[:3] + (cout,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_im2col_grad(x, kernel, strides, pads, dilation):
  """XLA's convolution with an im2col + matmul kernel gradient (first layers, cin <= 4)."""
  return xla_conv(x, kernel, strides, pads, 1, dilation)


def _conv_im2col_grad_fwd(x, kernel, strides, pads, dilation):
  return xla_conv(x, kernel, strides, pads, 1, dilation), (x, kernel)


def _conv_im2col_grad_bwd(strides, pads, dilation, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: xla_conv(x_, kernel, strides, pads, 1, dilation), x)
  (dx,) = input_vjp(g)
  kh, kw, cin, cout = kernel.shape
  patches = _im2col(x, (kh, kw), strides, pads, dilation)
  acc = acc_dtype(jnp.result_type(x.dtype, g.dtype))
  dk = lax.dot_general(patches.reshape(-1, kh * kw * cin), g.reshape(-1, cout),
                       (((0,), (0,)), ((), ())), preferred_element_type=acc)
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


conv_im2col_grad.defvjp(_conv_im2col_grad_fwd, _conv_im2col_grad_bwd)
