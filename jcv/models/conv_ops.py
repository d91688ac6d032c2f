"""Convolution primitives used by every jcv layer.

One entry point, :func:`conv2d`, with NHWC inputs and HWIO kernels (Flax's layout). It
computes ``lax.conv_general_dilated`` exactly, through one of these lowerings:

* ``"xla"``: XLA's own convolution (GPU/TPU; stock Flax).
* ``"cpu"``: exact jnp rewrites where XLA:CPU (one core per convolution) is slow, XLA's conv
  elsewhere:

  - 1x1 convolutions (any stride) are a strided slice and a matrix multiply;
  - depthwise convolutions (``groups == in_channels``, any channel multiplier) are
    ``kh * kw`` shifted multiply-adds that XLA fuses into one loop, forward and backward;
  - ungrouped convolutions on maps with fewer pixels than kernel taps (a 3x3 kernel on a 2x2
    or 1x1 map, as in ResNets on 32 px images) are one matrix multiply with the kernel
    unrolled over the whole map, skipping the taps that only see padding (9x fewer FLOPs than
    im2col on a 1x1 map, 2.25x on a 2x2 one);
  - other ungrouped convolutions with tiny outputs (at most 2x2 pixels, 4x4 with 256+ or 7x7
    with 512+ input channels) are im2col + one matrix multiply, forward and backward;
  - first layers with tiny kernels (``kh * kw * cin <= 16``, e.g. a 2x2 kernel on RGB) are
    im2col + one matrix multiply, forward and backward;
  - other first layers (at most 4 input channels) keep XLA's forward convolution but compute
    the kernel gradient as im2col + matrix multiply (a ``jax.custom_vjp``);
  - everything else stays with XLA.
* ``"onednn"``: oneDNN's convolutions (forward, input and kernel gradient) through XLA's FFI
  (:mod:`jcv.models.onednn`, multi-threaded, AVX-512/AMX), keeping the "cpu" rewrites only
  where they measured faster (``benchmarks/layers.py``): maps with fewer pixels than kernel
  taps (unrolled kernel), tiny-kernel first layers (kh*kw*cin <= 16) and outputs of at most
  2x2 pixels (im2col), and XLA's conv for first layers (cin <= 4) on inputs of at most
  64x64 pixels.
  Falls back to "cpu" with a one-line warning when the native library cannot be built.
* ``"auto"``: "onednn" on a CPU backend when it is available (else "cpu"); "xla" elsewhere.

All lowerings compute the same function as ``lax.conv_general_dilated`` (tests compare them
to 1e-5 in float32). bfloat16 inputs are computed with float32 accumulation and rounded once.

The choice is explicit: ``conv2d(..., lowering="onednn")``, a ``lowering`` field on
:class:`jcv.models.layers.Conv`, or :func:`make_conv` for a conv function to inject. Without
one, :func:`conv2d` uses the default lowering: ``$JCV_CONV_LOWERING`` or "auto", changed with
:func:`set_lowering` or the :func:`lowering` context manager. The default is a JAX config
option that is part of ``jax.jit``'s cache key, so a function traced under one lowering is
retraced under another (no stale cached trace).
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jcv.models import onednn

__all__ = ["LOWERINGS", "conv2d", "get_lowering", "lowering", "make_conv", "normalize_padding",
           "resolve", "resolved_lowering", "set_lowering"]

LOWERINGS = ("auto", "xla", "cpu", "onednn")
_DIMS = ("NHWC", "HWIO", "NHWC")


def _check_lowering(name: str) -> str:
  name = str(name).lower()
  if name not in LOWERINGS:
    raise ValueError(f"conv lowering must be one of {LOWERINGS}, got {name!r}")
  return name


def _make_state():
  """The default lowering as a JAX config option in the jit cache key (plain dict if absent)."""
  default = _check_lowering(os.environ.get("JCV_CONV_LOWERING", "auto"))
  try:
    from jax._src import config as jax_config
    return jax_config.enum_state(
        "jcv_conv_lowering", list(LOWERINGS), default,
        "Default convolution lowering of jcv.models.conv_ops.conv2d.",
        include_in_jit_key=True, include_in_trace_context=True)
  except Exception:  # private API moved: a plain value (then set it before jitting)
    return None


_STATE = _make_state()
_fallback = {"lowering": os.environ.get("JCV_CONV_LOWERING", "auto").lower()}


def set_lowering(name: str) -> str:
  """Sets the default conv lowering ("auto", "xla", "cpu", "onednn"); returns the previous one."""
  name, previous = _check_lowering(name), get_lowering()
  if _STATE is not None:
    jax.config.update("jcv_conv_lowering", name)
  else:
    _fallback["lowering"] = name
  return previous


def get_lowering() -> str:
  """The default lowering name, possibly "auto"."""
  return _check_lowering(_STATE.value if _STATE is not None else _fallback["lowering"])


def resolve(name: str | None = None) -> str:
  """The concrete lowering for ``name`` (None: the default) on ``jax.default_backend()``.

  "auto" is "onednn" on a CPU backend when the native library is available, else "cpu";
  "auto" and "onednn" are "xla" on other backends. "onednn" without the native library is
  "cpu" (warned once).
  """
  name = get_lowering() if name is None else _check_lowering(name)
  if name in ("auto", "onednn") and jax.default_backend() != "cpu":
    return "xla"  # the rewrites and oneDNN are for XLA:CPU
  if name == "auto":
    name = "onednn"
  if name == "onednn" and not onednn.available():
    onednn.warn_unavailable()
    return "cpu"
  return name


def resolved_lowering() -> str:
  """The lowering :func:`conv2d` uses now without a ``lowering`` argument."""
  return resolve(None)


@contextlib.contextmanager
def lowering(name: str) -> Iterator[None]:
  """Context manager that sets the default conv lowering for the functions traced inside it."""
  name = _check_lowering(name)
  if _STATE is not None:
    with _STATE(name):
      yield
    return
  previous = set_lowering(name)
  try:
    yield
  finally:
    set_lowering(previous)


def make_conv(lowering: str | None = None) -> Callable:
  """A conv function with :func:`conv2d`'s signature bound to one lowering (to inject)."""
  name = None if lowering is None else _check_lowering(lowering)
  return functools.partial(conv2d, lowering=name)


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


def _pair(value, what: str) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 2:
    raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")
  return value


def conv2d(x: jax.Array, kernel: jax.Array, *, strides=(1, 1), padding="SAME",
           groups: int = 1, dilation=(1, 1), lowering: str | None = None) -> jax.Array:
  """2-D convolution, NHWC input, HWIO kernel of shape (kh, kw, cin // groups, cout).

  Same result as ``lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)``. ``lowering``:
  "auto", "xla", "cpu" or "onednn" (see the module docstring); None uses the default.
  """
  strides = _pair(strides, "strides")
  dilation = _pair(dilation, "dilation")
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"conv2d expects NHWC input and HWIO kernel, got shapes {x.shape} and {kernel.shape}")
  kh, kw, kin, cout = kernel.shape
  cin = x.shape[-1]
  if groups < 1 or cin % groups or cout % groups or kin * groups != cin:
    raise ValueError(f"kernel {kernel.shape} does not fit input channels {cin} with groups={groups}")
  padding = normalize_padding(padding, (kh, kw))
  name = resolve(lowering)
  if name == "xla":
    return _xla_conv(x, kernel, strides, padding, groups, dilation)
  pads = _explicit_pads(x.shape[1:3], (kh, kw), strides, dilation, padding)
  if groups == 1 and x.shape[1] * x.shape[2] < kh * kw:
    return _conv_small_map(x, kernel, strides, pads, dilation)
  if name == "onednn":
    if _use_onednn(x, kernel, strides, pads, dilation, groups):
      x, kernel = onednn.match_vma(x, kernel)
      return _onednn_conv(x, kernel, strides, pads, dilation, groups)
    if groups == 1 and cin <= 4 and kh * kw * cin > 16 and x.shape[1] * x.shape[2] <= 64 * 64:
      return _xla_conv(x, kernel, strides, pads, groups, dilation)
  if groups == 1 and kh == kw == 1:
    return _conv_1x1(x, kernel, strides, pads)
  if groups == cin and kin == 1:
    return _depthwise(x, kernel, strides, pads, dilation)
  if groups == 1:
    out_pixels = (_out_size(x.shape[1], kh, strides[0], dilation[0], pads[0])
                  * _out_size(x.shape[2], kw, strides[1], dilation[1], pads[1]))
    if out_pixels <= 4 or (out_pixels <= 16 and cin >= 256) or (out_pixels <= 49 and cin >= 512):
      return _conv_im2col(x, kernel, strides, pads, dilation)
    if kh * kw * cin <= 16:  # e.g. a 2x2 whitening layer on RGB: 7x faster than XLA's conv
      return _conv_im2col(x, kernel, strides, pads, dilation)
    if cin <= 4:
      return _conv_im2col_grad(x, kernel, strides, pads, dilation)
  return _xla_conv(x, kernel, strides, pads, groups, dilation)


# --- oneDNN through XLA's FFI ---------------------------------------------------------------

def _use_onednn(x, kernel, strides, pads, dilation, groups) -> bool:
  """Whether oneDNN beats the "cpu" rewrites for this layer.

  Measured with ``benchmarks/layers.py --batch 32`` (forward + backward, 2-core EPYC, see
  docs/benchmarks.md): oneDNN wins on depthwise (1.6-8.7x), 224 px stems (1.7-2.3x) and
  general 3x3 convolutions down to 4x4 maps (1.1-2.0x), and its 1x1 forward beats the matmul
  (1.3-1.4x); the rewrites win on the 2x2 whitening layer (5x) and outputs of at most 2x2
  pixels (1.7x); XLA's own conv wins on a stem at 32x32 (2-3x, up to 64x64 pixels here). 1x1
  gradients per layer were as fast as the matmul's, but whole MobileNetV2 training steps
  (160 px, one device, with jcv's native BatchNorm) ran 12-15 % faster with oneDNN's.
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
  if kin <= 4 and x.shape[1] * x.shape[2] <= 64 * 64:  # a small stem: XLA's conv (below)
    return False
  out_pixels = (_out_size(x.shape[1], kh, strides[0], dilation[0], pads[0])
                * _out_size(x.shape[2], kw, strides[1], dilation[1], pads[1]))
  return out_pixels > 4


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _onednn_conv(x, kernel, strides, pads, dilation, groups):
  out_hw = (_out_size(x.shape[1], kernel.shape[0], strides[0], dilation[0], pads[0]),
            _out_size(x.shape[2], kernel.shape[1], strides[1], dilation[1], pads[1]))
  return onednn.conv_forward(x, kernel, out_hw, strides, pads, dilation, groups)


def _onednn_conv_fwd(x, kernel, strides, pads, dilation, groups):
  return _onednn_conv(x, kernel, strides, pads, dilation, groups), (x, kernel)


def _onednn_conv_bwd(strides, pads, dilation, groups, residuals, g):
  x, kernel = residuals
  g = g.astype(x.dtype)
  dx = onednn.conv_backward_data(g, kernel, x.shape[1:3], x.shape[3], strides, pads, dilation, groups)
  if x.dtype == jnp.bfloat16:
    # oneDNN 3.2's bfloat16 kernel gradient (AVX512-BF16, no AMX) ran 6x slower than its float32
    # one in a cifar_cnn step (1140 vs 179 CPU ms, 2-core EPYC): compute it from float32 copies.
    dk = onednn.conv_backward_weights(x.astype(jnp.float32), g.astype(jnp.float32), kernel.shape,
                                      strides, pads, dilation, groups).astype(kernel.dtype)
  else:
    dk = onednn.conv_backward_weights(x, g, kernel.shape, strides, pads, dilation, groups)
  return dx, dk


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


# --- XLA's convolution --------------------------------------------------------------------

def _xla_conv(x, kernel, strides, padding, groups, dilation):
  return lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=_DIMS, feature_group_count=groups)


# --- shared helpers -----------------------------------------------------------------------

def _explicit_pads(in_hw, k_hw, strides, dilation, padding):
  """(lo, hi) pads per spatial dim, SAME/VALID resolved exactly as lax does."""
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(k_hw, dilation)]
    return tuple(tuple(p) for p in lax.padtype_to_pads(in_hw, window, strides, padding))
  return tuple(tuple(p) for p in padding)


def _out_size(size, k, stride, dil, pad):
  return (size + pad[0] + pad[1] - (k - 1) * dil - 1) // stride + 1


def _pad_hw(x, pads):
  if all(lo == 0 and hi == 0 for lo, hi in pads):
    return x
  zero = jnp.zeros((), x.dtype)
  return lax.pad(x, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def _taps(xp, k_hw, out_hw, strides, dilation):
  """The kh*kw shifted (strided) windows of the padded input, in HW order."""
  n, _, _, c = xp.shape
  (ho, wo), (sh, sw), (dh, dw) = out_hw, strides, dilation
  for i in range(k_hw[0]):
    for j in range(k_hw[1]):
      start = (0, i * dh, j * dw, 0)
      limit = (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c)
      yield lax.slice(xp, start, limit, (1, sh, sw, 1))


def _acc_dtype(dtype):
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


# --- 1x1: slice + matmul ------------------------------------------------------------------

def _conv_1x1(x, kernel, strides, pads):
  xp = _pad_hw(x, pads)
  n, h, w, cin = xp.shape
  ho, wo = (h - 1) // strides[0] + 1, (w - 1) // strides[1] + 1
  if strides != (1, 1):
    xp = lax.slice(xp, (0, 0, 0, 0), (n, (ho - 1) * strides[0] + 1, (wo - 1) * strides[1] + 1, cin),
                   (1, strides[0], strides[1], 1))
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  y = lax.dot_general(xp.reshape(n * ho * wo, cin), kernel.reshape(cin, -1),
                      (((1,), (0,)), ((), ())), preferred_element_type=_acc_dtype(out_dtype))
  return y.astype(out_dtype).reshape(n, ho, wo, -1)


# --- maps smaller than the kernel: one matmul with the kernel unrolled over the map --------

def _small_map_links(in_hw, k_hw, strides, pads, dilation):
  """``links[a, b, u, v]``: the kernel tap (i, j) linking input pixel (a, b) to output pixel
  (u, v), or None; and the output size."""
  out_hw = tuple(_out_size(in_hw[d], k_hw[d], strides[d], dilation[d], pads[d]) for d in (0, 1))

  def tap(pixel, out, d):
    i, rem = divmod(pixel + pads[d][0] - out * strides[d], dilation[d])
    return i if rem == 0 and 0 <= i < k_hw[d] else None

  links = {}
  for a in range(in_hw[0]):
    for b in range(in_hw[1]):
      for u in range(out_hw[0]):
        for v in range(out_hw[1]):
          i, j = tap(a, u, 0), tap(b, v, 1)
          links[a, b, u, v] = None if i is None or j is None else (i, j)
  return links, out_hw


def _unrolled_kernel(kernel, links, in_hw, out_hw):
  """The conv as a (h*w*cin, ho*wo*cout) matrix: block ((a, b), (u, v)) is the tap
  ``links[a, b, u, v]`` (:func:`_small_map_links`), or zeros. Built row by row (no transposes)."""
  _, _, cin, cout = kernel.shape
  ho, wo = out_hw
  zero = jnp.zeros((cin, cout), kernel.dtype)
  rows = []
  for a in range(in_hw[0]):
    for b in range(in_hw[1]):
      blocks = [zero if links[a, b, u, v] is None else kernel[links[a, b, u, v]]
                for u in range(ho) for v in range(wo)]
      rows.append(jnp.concatenate(blocks, axis=1))
  return jnp.concatenate(rows, axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_small_map(x, kernel, strides, pads, dilation):
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
                      preferred_element_type=_acc_dtype(out_dtype))
  return y.astype(out_dtype).reshape(n, ho, wo, kernel.shape[-1])


def _conv_small_map_fwd(x, kernel, strides, pads, dilation):
  return _conv_small_map(x, kernel, strides, pads, dilation), (x, kernel)


def _conv_small_map_bwd(strides, pads, dilation, residuals, g):
  x, kernel = residuals
  n, h, w, cin = x.shape
  kh, kw, _, cout = kernel.shape
  acc = _acc_dtype(jnp.result_type(x.dtype, g.dtype))
  links, out_hw = _small_map_links((h, w), (kh, kw), strides, pads, dilation)
  unrolled = _unrolled_kernel(kernel, links, (h, w), out_hw)
  dx = lax.dot_general(g.reshape(n, -1), unrolled, (((1,), (1,)), ((), ())),
                       preferred_element_type=acc).astype(x.dtype).reshape(x.shape)
  live = sorted({t for t in links.values() if t is not None})
  if not live:  # every output sees only padding
    return dx, jnp.zeros_like(kernel)
  windows = dict(zip([(i, j) for i in range(kh) for j in range(kw)],
                     _taps(_pad_hw(x, pads), (kh, kw), out_hw, strides, dilation)))
  patches = jnp.concatenate([windows[t] for t in live], axis=-1)
  dk_live = lax.dot_general(patches.reshape(-1, len(live) * cin), g.reshape(-1, cout),
                            (((0,), (0,)), ((), ())), preferred_element_type=acc)
  dk_live = dk_live.astype(kernel.dtype).reshape(len(live), cin, cout)
  if len(live) == kh * kw:
    return dx, dk_live.reshape(kernel.shape)
  position = {t: k for k, t in enumerate(live)}
  zero = jnp.zeros((cin, cout), kernel.dtype)
  taps = [dk_live[position[i, j]] if (i, j) in position else zero for i in range(kh) for j in range(kw)]
  return dx, jnp.stack(taps).reshape(kernel.shape)


_conv_small_map.defvjp(_conv_small_map_fwd, _conv_small_map_bwd)


# --- depthwise: shifted multiply-adds -----------------------------------------------------

# Bytes of one tap's window per iteration of the blocked kernel-gradient loop: all kh*kw
# windows of a block then stay in a core's L2 cache (64-128 KiB measured best on a 2 MiB L2).
_DW_BLOCK_BYTES = 128 << 10


def _depthwise_out_hw(x_shape, kernel_shape, strides, pads, dilation):
  return (_out_size(x_shape[1], kernel_shape[0], strides[0], dilation[0], pads[0]),
          _out_size(x_shape[2], kernel_shape[1], strides[1], dilation[1], pads[1]))


def _depthwise_forward(x, kernel, strides, pads, dilation):
  kh, kw, _, cout = kernel.shape
  mult = cout // x.shape[-1]
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  acc = _acc_dtype(out_dtype)
  out_hw = _depthwise_out_hw(x.shape, kernel.shape, strides, pads, dilation)
  xp = _pad_hw(x, pads)
  if mult > 1:  # output channel c * mult + m reads input channel c
    xp = jnp.repeat(xp, mult, axis=-1)
  k = kernel.reshape(kh * kw, cout).astype(acc)
  y = None
  for t, window in enumerate(_taps(xp, (kh, kw), out_hw, strides, dilation)):
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
  acc = _acc_dtype(jnp.result_type(x.dtype, g.dtype))
  xp = _pad_hw(x, pads)
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
                      for w in _taps(xb, (kh, kw), (rows, wo), strides, dilation)])

  blocks = (n // images) * row_blocks
  if blocks == 1:
    dk = block_grad(0)
  else:
    dk, _ = lax.scan(lambda total, b: (total + block_grad(b), None),
                     jnp.zeros((kh * kw, cout), acc), jnp.arange(blocks))
  return dk.reshape(kernel_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise(x, kernel, strides, pads, dilation):
  return _depthwise_forward(x, kernel, strides, pads, dilation)


def _depthwise_fwd(x, kernel, strides, pads, dilation):
  return _depthwise_forward(x, kernel, strides, pads, dilation), (x, kernel)


def _depthwise_bwd(strides, pads, dilation, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _depthwise_forward(x_, kernel, strides, pads, dilation), x)
  (dx,) = input_vjp(g)
  dk = _depthwise_kernel_grad(x, g, kernel.shape, strides, pads, dilation)
  return dx, dk.astype(kernel.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


# --- general conv: XLA forward and input gradient, im2col kernel gradient -----------------

def _im2col(x, k_hw, strides, pads, dilation):
  """Patches [N, Ho, Wo, kh*kw*C], ordered like an HWIO kernel reshaped to (kh*kw*C, O)."""
  h, w = x.shape[1:3]
  out_hw = (_out_size(h, k_hw[0], strides[0], dilation[0], pads[0]),
            _out_size(w, k_hw[1], strides[1], dilation[1], pads[1]))
  taps = list(_taps(_pad_hw(x, pads), k_hw, out_hw, strides, dilation))
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _conv_im2col(x, kernel, strides, pads, dilation):
  """im2col + one matrix multiply (autodiff gives matmul gradients too).

  XLA:CPU's convolution is slow on tiny feature maps with many channels (2x2x256: 14x the
  CPU time of this), and matmuls use every core.
  """
  kh, kw, cin, cout = kernel.shape
  patches = _im2col(x, (kh, kw), strides, pads, dilation)
  out_dtype = jnp.result_type(x.dtype, kernel.dtype)
  y = lax.dot_general(patches.reshape(-1, kh * kw * cin), kernel.reshape(kh * kw * cin, cout),
                      (((1,), (0,)), ((), ())), preferred_element_type=_acc_dtype(out_dtype))
  return y.astype(out_dtype).reshape(patches.shape[:3] + (cout,))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_im2col_grad(x, kernel, strides, pads, dilation):
  return _xla_conv(x, kernel, strides, pads, 1, dilation)


def _conv_im2col_grad_fwd(x, kernel, strides, pads, dilation):
  return _xla_conv(x, kernel, strides, pads, 1, dilation), (x, kernel)


def _conv_im2col_grad_bwd(strides, pads, dilation, residuals, g):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _xla_conv(x_, kernel, strides, pads, 1, dilation), x)
  (dx,) = input_vjp(g)
  kh, kw, cin, cout = kernel.shape
  patches = _im2col(x, (kh, kw), strides, pads, dilation)
  acc = _acc_dtype(jnp.result_type(x.dtype, g.dtype))
  dk = lax.dot_general(patches.reshape(-1, kh * kw * cin), g.reshape(-1, cout),
                       (((0,), (0,)), ((), ())), preferred_element_type=acc)
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_im2col_grad.defvjp(_conv_im2col_grad_fwd, _conv_im2col_grad_bwd)
