"""jcv's native CPU library: build, load and configure ``onednn_conv.cc``, ``onednn_ffi.cc``,
``depthwise_grad.cc`` and ``native_bn.cc``.

The library holds oneDNN's convolutions (called by :mod:`jcv.kernels.onednn`; a direct loop for
depthwise kernel gradients) and the BatchNorm reductions of :mod:`jcv.kernels.batchnorm`, as XLA
FFI targets. Each bfloat16 convolution shape, and each depthwise kernel gradient, runs the
implementation measured fastest on its first call (``Choose`` in ``onednn_conv.cc``);
``JCV_ONEDNN_IMPL=first|noamx|upcast|direct`` forces one where it applies (the choice is made per
process, so only a forced one repeats such runs bit for bit across processes). The C++ files are
compiled on first use (:mod:`jcv.kernels.build`: cached in ``$JCV_CACHE_DIR``, default
``~/.cache/jcv``, ``/native``, and loaded only from a folder no other user can write). No
network is used. When anything is missing (another OS or CPU, no compiler, no oneDNN),
:func:`available` is False, jcv warns once in one line and uses XLA's convolutions. ``JCV_ONEDNN=0`` turns the native path off.
"""
from __future__ import annotations

import ctypes
import os
import platform
import warnings

import jax

from jcv.kernels.build import built_library, find_onednn

__all__ = ["BN_TARGETS", "CONV_TARGETS", "FUSED_TARGETS", "available", "default_threads", "library_path", "require",
           "set_threads", "status", "unavailable_reason", "warn_unavailable"]

CONV_TARGETS = ("jcv_onednn_conv_fwd", "jcv_onednn_conv_bwd_data", "jcv_onednn_conv_bwd_weights")
FUSED_TARGETS = ("jcv_onednn_conv_fused", "jcv_onednn_conv_fused_res")  # act(conv + bias [+ residual])
BN_TARGETS = ("jcv_bn_stats", "jcv_bn_bwd_stats")
_state: dict = {"lib": None, "reason": None, "warned": False, "path": None}


def _load():
  if _state["lib"] is not None or _state["reason"] is not None:
    return _state["lib"]
  try:
    if os.environ.get("JCV_ONEDNN", "1").lower() in ("0", "false", "no", "off"):
      raise RuntimeError("disabled by JCV_ONEDNN=0")
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
      raise RuntimeError(f"needs Linux x86-64, this is {platform.system()} {platform.machine()}")
    with built_library(*find_onednn()) as path:
      handle = ctypes.CDLL(path)
    for name in CONV_TARGETS + FUSED_TARGETS + BN_TARGETS:
      jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(handle, name)), platform="cpu")
    handle.jcv_onednn_set_threads.argtypes = [ctypes.c_int]
    handle.jcv_native_bn_set_threads.argtypes = [ctypes.c_int]
    _state.update(lib=handle, path=path)
    set_threads(int(os.environ.get("JCV_ONEDNN_THREADS") or default_threads()))
  except Exception as e:  # any failure: XLA's convolutions instead
    _state["reason"] = f"{type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e)
  return _state["lib"]


def available() -> bool:
  """True if the native oneDNN convolutions are built and loaded (builds them on first call)."""
  return _load() is not None


def unavailable_reason() -> str | None:
  """Why :func:`available` is False (None when it is True)."""
  _load()
  return _state["reason"]


def warn_unavailable() -> None:
  """Warns once, in one line, that jcv falls back to XLA's convolutions."""
  if not _state["warned"] and not available():
    _state["warned"] = True
    warnings.warn(f"jcv: oneDNN convolutions unavailable ({_state['reason']}); using XLA's "
                  "convolutions", RuntimeWarning, stacklevel=3)


def library_path() -> str | None:
  """The loaded shared library's path (None if unavailable)."""
  _load()
  return _state["path"]


def status() -> dict:
  """Availability, reason, library path and oneDNN version, for logs and benchmarks."""
  lib = _load()
  version = None
  if lib is not None:
    v = lib.jcv_onednn_version()
    version = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
  return {"available": lib is not None, "reason": _state["reason"], "path": _state["path"],
          "onednn": version, "threads": _state.get("threads", 0)}


def default_threads() -> int:
  """Cores per local XLA CPU device: each device's convolutions get their share of the cores."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:
    cores = os.cpu_count() or 1
  return max(1, cores // max(1, len(jax.local_devices(backend="cpu"))))


def set_threads(threads: int) -> None:
  """OpenMP threads per oneDNN / BatchNorm call (0: OpenMP's default, all cores or ``$OMP_NUM_THREADS``).

  Applies to primitives created afterwards (they are cached per thread count).
  """
  lib = _load()
  if lib is not None:
    lib.jcv_onednn_set_threads(int(threads))
    lib.jcv_native_bn_set_threads(int(threads))
    _state["threads"] = int(threads)


def require() -> None:
  """Builds and loads the library, or raises RuntimeError saying why it is unavailable."""
  if not available():
    raise RuntimeError(f"jcv native library unavailable: {_state['reason']}")
