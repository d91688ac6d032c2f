"""oneDNN convolutions on the CPU through XLA's FFI: the calls into ``onednn_conv.cc``.

:func:`conv` is oneDNN's convolution with its input and kernel gradients (a
``jax.custom_vjp``), for NHWC activations, HWIO kernels and explicit ``(lo, hi)`` pads;
:func:`use_onednn` says where it beats the jnp rewrites. The library is built and loaded by
:mod:`jcv.kernels.native`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jcv.kernels import native
from jcv.kernels.geometry import out_hw as conv_out_hw, out_size
from jcv.kernels.sharding import batch_axis, match_vma, varying_like

__all__ = ["ACT_CODES", "conv", "conv_backward_data", "conv_backward_weights", "conv_bias_act", "conv_forward",
           "use_onednn"]

ACT_CODES = {None: 0, "relu": 1, "relu6": 2}  # the activations oneDNN applies as a post-op


def _attrs(strides, pads, dilation, groups):
  (pt, pb), (pl, pr) = pads
  return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(pt), pb=np.int64(pb),
              pl=np.int64(pl), pr=np.int64(pr), dh=np.int64(dilation[0]), dw=np.int64(dilation[1]),
              groups=np.int64(groups))


def _ffi(kind, cfg, a, b):  # (a, b): (x, kernel), (dy, kernel), (x, dy)
  """The FFI call itself: kind 0/1/2 = forward / input gradient / kernel gradient."""
  out_tail, strides, pads, dilation, groups = cfg
  lead = () if kind == 2 else a.shape[:1]
  out = jax.ffi.ffi_call(native.CONV_TARGETS[kind], jax.ShapeDtypeStruct(lead + out_tail, a.dtype),
                         vmap_method="expand_dims")(a, b, **_attrs(strides, pads, dilation, groups))
  return varying_like(out, a, b)


# Sharding rules: only the batch (N) may be sharded; the kernel gradient sums over it.
_RULES = {
    0: ("n h w c, a b d o -> n i j o", (), ("h", "w", "c", "a", "b", "d", "o", "i", "j")),
    1: ("n i j o, a b d o -> n h w c", (), ("i", "j", "o", "a", "b", "d", "h", "w", "c")),
    2: ("n h w c, n i j o -> a b d o", ("n",), ("h", "w", "c", "i", "j", "o", "a", "b", "d")),
}


def _batch_partitioned(plain, batched, rule, reduction, replicated):
  """``plain`` partitioned over the batch under a sharded ``jit``, plain under ``vmap``.

  ``custom_partitioning`` tells XLA's SPMD partitioner (Shardy or GSPMD) that every device
  runs the call on its shard of the batch instead of all-gathering the operands: operand i is
  split on its batch axis where ``batched[i]``, replicated otherwise; with a ``reduction`` the
  output is a sum over the batch (psum-ed, replicated). Its ``custom_vmap`` rule sends
  ``vmap`` to the plain call.
  """
  from jax.experimental.custom_partitioning import custom_partitioning
  from jax.sharding import NamedSharding, PartitionSpec as P

  def out_sharding(mesh, axis):
    return NamedSharding(mesh, P() if reduction else P(axis))

  def infer(mesh, arg_shapes, result_shape):
    return out_sharding(mesh, batch_axis(arg_shapes[0].sharding))

  def partition(mesh, arg_shapes, result_shape):
    axis = batch_axis(arg_shapes[0].sharding)
    args = tuple(NamedSharding(mesh, P(axis) if b else P()) for b in batched)

    def lower(*xs):
      out = plain(*xs)
      return jax.lax.psum(out, axis) if reduction and axis is not None else out
    return mesh, lower, out_sharding(mesh, axis), args

  partitioned = custom_partitioning(plain)
  partitioned.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                            reduction_factors=reduction, need_replication_factors=replicated)

  @jax.custom_batching.custom_vmap
  def op(*args):
    return partitioned(*args)

  @op.def_vmap
  def _(axis_size, in_batched, *args):
    del axis_size
    return jax.vmap(plain, in_axes=tuple(0 if x else None for x in in_batched))(*args), True
  return op


@functools.lru_cache(maxsize=None)
def _op(kind, cfg):
  """The FFI call for one configuration (only the batch may be sharded; the kernel gradient sums over it)."""
  native.require()  # builds and registers the FFI targets on first use

  def plain(a, b):
    return _ffi(kind, cfg, a, b)
  rule, reduction, replicated = _RULES[kind]
  return _batch_partitioned(plain, (True, kind == 2), rule, reduction, replicated)


def _cfg(out_tail, strides, pads, dilation, groups):
  return (tuple(int(v) for v in out_tail), tuple(int(v) for v in strides),
          tuple((int(lo), int(hi)) for lo, hi in pads), tuple(int(v) for v in dilation), int(groups))


def conv_forward(x, kernel, out_hw, strides, pads, dilation, groups):
  """y = conv(x, kernel): x [N, H, W, C], kernel HWIO, explicit pads ((t, b), (l, r))."""
  cfg = _cfg(tuple(out_hw) + kernel.shape[-1:], strides, pads, dilation, groups)
  return _op(0, cfg)(x, kernel)


def conv_backward_data(dy, kernel, in_hw, in_channels, strides, pads, dilation, groups):
  """dL/dx from dL/dy."""
  cfg = _cfg(tuple(in_hw) + (in_channels,), strides, pads, dilation, groups)
  return _op(1, cfg)(dy, kernel)


def conv_backward_weights(x, dy, kernel_shape, strides, pads, dilation, groups):
  """dL/dkernel (HWIO) from the input and dL/dy."""
  return _op(2, _cfg(kernel_shape, strides, pads, dilation, groups))(x, dy)


def use_onednn(x, kernel, strides, pads, dilation, groups) -> bool:
  """Whether oneDNN beats the "cpu" rewrites for this layer.

  The routing follows per-layer measurements (``benchmarks/layers.py``; the numbers and the
  machine are in docs/benchmarks.md): oneDNN for depthwise, large stems, 3x3 convolutions down
  to 4x4 maps and 1x1 convolutions; the rewrites for the 2x2 whitening layer and outputs of at
  most 2x2 pixels; for small stems XLA's forward with the im2col kernel gradient.
  """
  if x.dtype != kernel.dtype or x.dtype not in (jnp.float32, jnp.bfloat16):
    return False
  if any(lo < 0 or hi < 0 for lo, hi in pads):
    return False
  kh, kw, kin, _ = kernel.shape
  if groups > 1 or kh == kw == 1:  # 1x1: forward and gradients (whole MobileNetV2 steps, below)
    return True
  if kh * kw * kin <= 16:
    return False
  if kin <= 4 and x.shape[1] * x.shape[2] <= 64 * 64:  # a small stem: XLA's forward, im2col kernel gradient
    return False
  out_pixels = (out_size(x.shape[1], kh, strides[0], dilation[0], pads[0])
                * out_size(x.shape[2], kw, strides[1], dilation[1], pads[1]))
  return out_pixels > 4


def conv(x, kernel, strides, pads, dilation, groups):
  """oneDNN's convolution (any layer; shard_map-typed operands matched first), differentiable."""
  x, kernel = match_vma(x, kernel)
  return _conv(x, kernel, strides, pads, dilation, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, kernel, strides, pads, dilation, groups):
  return conv_forward(x, kernel, conv_out_hw(x.shape, kernel.shape, strides, pads, dilation),
                      strides, pads, dilation, groups)


def _conv_fwd(x, kernel, strides, pads, dilation, groups):
  return _conv(x, kernel, strides, pads, dilation, groups), (x, kernel)


def _conv_bwd(strides, pads, dilation, groups, residuals, g):
  x, kernel = residuals
  g = g.astype(x.dtype)
  # bfloat16: oneDNN accumulates in float32 and rounds once. Each bfloat16 shape and each depthwise
  # kernel gradient runs the implementation measured fastest on its first call (onednn_conv.cc, Choose).
  dx = conv_backward_data(g, kernel, x.shape[1:3], x.shape[3], strides, pads, dilation, groups)
  dk = conv_backward_weights(x, g, kernel.shape, strides, pads, dilation, groups)
  return dx, dk


_conv.defvjp(_conv_fwd, _conv_bwd)


# The inference form: act(conv(x, kernel) + bias [+ residual]) in one call. --------------------------

@functools.lru_cache(maxsize=None)
def _fused_op(cfg, act, residual: bool):
  native.require()
  out_tail, strides, pads, dilation, groups = cfg
  target = native.FUSED_TARGETS[int(residual)]

  def plain(*args):
    out = jax.ShapeDtypeStruct(args[0].shape[:1] + out_tail, args[0].dtype)
    y = jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        *args, **_attrs(strides, pads, dilation, groups), act=np.int64(ACT_CODES[act]))
    return varying_like(y, *args)
  rule = "n h w c, a b d o, o" + (", n i j o" if residual else "") + " -> n i j o"
  batched = (True, False, False) + ((True,) if residual else ())
  return _batch_partitioned(plain, batched, rule, (), ("h", "w", "c", "a", "b", "d", "o", "i", "j"))


def conv_bias_act(x, kernel, bias, residual, act, strides, pads, dilation, groups):
  """``act(conv(x, kernel) + bias [+ residual])`` as one oneDNN convolution with the bias and
  post-ops (a binary add, then ReLU or ReLU6 as clip(0, 6)); ``act`` a key of :data:`ACT_CODES`.
  ``bias`` is float32, ``residual`` None or shaped like the output. Differentiable (the
  gradients are oneDNN's, as :func:`conv`'s)."""
  if act not in ACT_CODES:
    raise ValueError(f"act must be one of {tuple(ACT_CODES)}, got {act!r}")
  operands = (x, kernel, bias.astype(jnp.float32)) + (() if residual is None else (residual.astype(x.dtype),))
  x, kernel, bias, *residual = match_vma(*operands)
  return _fused(x, kernel, bias, residual[0] if residual else None, act, strides, pads, dilation, groups)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _fused(x, kernel, bias, residual, act, strides, pads, dilation, groups):
  cfg = _cfg(tuple(conv_out_hw(x.shape, kernel.shape, strides, pads, dilation)) + kernel.shape[-1:],
             strides, pads, dilation, groups)
  args = (x, kernel, bias) + (() if residual is None else (residual,))
  return _fused_op(cfg, act, residual is not None)(*args)


def _fused_fwd(x, kernel, bias, residual, act, strides, pads, dilation, groups):
  y = _fused(x, kernel, bias, residual, act, strides, pads, dilation, groups)
  return y, (x, kernel, y, None if residual is None else ())  # (): an empty pytree saying 'had one'


def _fused_bwd(act, strides, pads, dilation, groups, residuals, g):
  x, kernel, y, had_residual = residuals
  if act is not None:
    g = jnp.where((y > 0) & (y < 6) if act == "relu6" else y > 0, g, 0)
  dx, dk = _conv_bwd(strides, pads, dilation, groups, (x, kernel), g)
  dbias = g.astype(jnp.float32).sum((0, 1, 2))
  return dx, dk, dbias, g.astype(x.dtype) if had_residual is not None else None


_fused.defvjp(_fused_fwd, _fused_bwd)
