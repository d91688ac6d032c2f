"""The convolution every jcv layer calls, :func:`conv2d`, and the choice of its lowering.

One entry point with NHWC inputs and HWIO kernels (Flax's layout). It computes
``lax.conv_general_dilated`` exactly, through one of these lowerings:

* ``"xla"``: XLA's own convolution (GPU/TPU; stock Flax).
* ``"cpu"``: exact jnp rewrites where XLA:CPU (one core per convolution) is slow, XLA's conv
  elsewhere (:mod:`jcv.kernels.rewrites`, :mod:`jcv.kernels.depthwise`):

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
  (:mod:`jcv.kernels.onednn`, multi-threaded, AVX-512/AMX), keeping the "cpu" rewrites only
  where they measured faster (``benchmarks/layers.py``): maps with fewer pixels than kernel
  taps (unrolled kernel), tiny-kernel first layers (kh*kw*cin <= 16) and outputs of at most
  2x2 pixels (im2col), and for first layers (cin <= 4) on inputs of at most 64x64 pixels
  XLA's forward with the im2col kernel gradient.
  Falls back to "cpu" with a one-line warning when the native library cannot be built.
* ``"auto"``: "onednn" on a CPU backend when it is available (else "cpu"); "xla" elsewhere.

All lowerings compute the same function as ``lax.conv_general_dilated`` (tests compare them
to 1e-5 in float32). bfloat16 inputs are computed with float32 accumulation and rounded once.

The choice is explicit: ``conv2d(..., lowering="onednn")`` or :func:`make_conv` for a conv
function to inject. Without one, :func:`conv2d` uses the default lowering:
``$JCV_CONV_LOWERING`` or "auto", changed with :func:`set_lowering` or the :func:`lowering`
context manager. The default is a JAX config option that is part of ``jax.jit``'s cache key,
so a function traced under one lowering is retraced under another (no stale cached trace).
:func:`max_pool` follows the same lowering.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator

import flax.linen as nn
import jax
from jax import lax

from jcv.kernels import native, onednn, pooling
from jcv.kernels.depthwise import depthwise
from jcv.kernels.geometry import explicit_pads, normalize_padding, out_size, pair
from jcv.kernels.rewrites import conv_1x1, conv_im2col, conv_im2col_grad, conv_small_map, xla_conv

__all__ = ["LOWERINGS", "conv2d", "get_lowering", "lowering", "make_conv", "max_pool", "onednn_pads",
           "resolve", "resolved_lowering", "set_lowering"]

LOWERINGS = ("auto", "xla", "cpu", "onednn")


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
        "Default convolution lowering of jcv.kernels.conv2d.",
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
  if name == "onednn" and not native.available():
    native.warn_unavailable()
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


def conv2d(x: jax.Array, kernel: jax.Array, *, strides=(1, 1), padding="SAME",
           groups: int = 1, dilation=(1, 1), lowering: str | None = None) -> jax.Array:
  """2-D convolution, NHWC input, HWIO kernel of shape (kh, kw, cin // groups, cout).

  Same result as ``lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dilation,
  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)``. ``lowering``:
  "auto", "xla", "cpu" or "onednn" (see the module docstring); None uses the default.
  """
  strides, dilation, padding = _checked(x, kernel, strides, padding, groups, dilation)
  name = resolve(lowering)
  if name == "xla":
    return xla_conv(x, kernel, strides, padding, groups, dilation)
  kh, kw, kin, cout = kernel.shape
  cin = x.shape[-1]
  pads = explicit_pads(x.shape[1:3], (kh, kw), strides, dilation, padding)
  if name == "onednn" and _runs_onednn(x, kernel, strides, pads, dilation, groups):
    return onednn.conv(x, kernel, strides, pads, dilation, groups)
  if groups == 1 and x.shape[1] * x.shape[2] < kh * kw:
    return conv_small_map(x, kernel, strides, pads, dilation)
  if groups == 1 and kh == kw == 1:
    return conv_1x1(x, kernel, strides, pads)
  if groups == cin and kin == 1:
    return depthwise(x, kernel, strides, pads, dilation)
  if groups == 1:
    out_pixels = (out_size(x.shape[1], kh, strides[0], dilation[0], pads[0])
                  * out_size(x.shape[2], kw, strides[1], dilation[1], pads[1]))
    if out_pixels <= 4 or (out_pixels <= 16 and cin >= 256) or (out_pixels <= 49 and cin >= 512):
      return conv_im2col(x, kernel, strides, pads, dilation)
    if kh * kw * cin <= 16:  # e.g. a 2x2 whitening layer on RGB: 7x faster than XLA's conv
      return conv_im2col(x, kernel, strides, pads, dilation)
    if cin <= 4:
      return conv_im2col_grad(x, kernel, strides, pads, dilation)
  return xla_conv(x, kernel, strides, pads, groups, dilation)


def _checked(x, kernel, strides, padding, groups, dilation):
  """(strides, dilation, padding) as pairs / normalised, after checking the shapes fit."""
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"conv2d expects NHWC input and HWIO kernel, got shapes {x.shape} and {kernel.shape}")
  kh, kw, kin, cout = kernel.shape
  cin = x.shape[-1]
  if groups < 1 or cin % groups or cout % groups or kin * groups != cin:
    raise ValueError(f"kernel {kernel.shape} does not fit input channels {cin} with groups={groups}")
  return pair(strides, "strides"), pair(dilation, "dilation"), normalize_padding(padding, (kh, kw))


def _runs_onednn(x, kernel, strides, pads, dilation, groups) -> bool:
  small_map = groups == 1 and x.shape[1] * x.shape[2] < kernel.shape[0] * kernel.shape[1]  # unrolled kernel
  return not small_map and onednn.use_onednn(x, kernel, strides, pads, dilation, groups)


def onednn_pads(x, kernel, *, strides=(1, 1), padding="SAME", groups: int = 1, dilation=(1, 1),
                lowering: str | None = None):
  """The explicit ``((top, bottom), (left, right))`` pads when :func:`conv2d` runs this layer on
  oneDNN under ``lowering`` (None: the default), else None."""
  strides, dilation, padding = _checked(x, kernel, strides, padding, groups, dilation)
  if resolve(lowering) != "onednn":
    return None
  pads = explicit_pads(x.shape[1:3], kernel.shape[:2], strides, dilation, padding)
  return pads if _runs_onednn(x, kernel, strides, pads, dilation, groups) else None


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding, *,
             lowering: str | None = None):
  """``nn.max_pool`` on NHWC; ``padding`` 'SAME'/'VALID' or explicit ``(lo, hi)`` pairs.

  With the "cpu" and "onednn" lowerings the gradient is elementwise passes instead of XLA:CPU's
  select-and-scatter (:mod:`jcv.kernels.pooling`): non-overlapping windows (``window ==
  strides``) are a reshape + max, others (up to ``pooling.MAX_TAPS`` taps) keep each window's
  arg-max from the forward pass and spread the gradient by stride phases. Same
  values and gradients as ``nn.max_pool``: where a window holds tied maxima, the first one in
  row-major order takes the gradient (as XLA's and PyTorch's).
  """
  window, strides = tuple(window), tuple(strides)
  if isinstance(padding, str):
    padding = padding.upper()
    pads = lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
  else:
    pads = padding
  if resolve(lowering) not in ("cpu", "onednn"):
    return nn.max_pool(x, window, strides, padding=padding)
  pads = [tuple(p) for p in pads]
  if window == strides:
    return pooling.block_max_pool(x, window, pads)
  if window[0] * window[1] > pooling.MAX_TAPS:
    return nn.max_pool(x, window, strides, padding=padding)
  return pooling.window_max_pool(x, window, strides, pads)
