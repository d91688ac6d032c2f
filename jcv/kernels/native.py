"""jcv's native CPU library: build, load and configure ``onednn_conv.cc`` + ``native_bn.cc``.

The library holds oneDNN's convolutions (called by :mod:`jcv.kernels.onednn`) and the
BatchNorm reductions of :mod:`jcv.kernels.batchnorm`, as XLA FFI targets. The C++ files are
compiled on first use with the system's ``g++`` against jaxlib's FFI headers
(``jax.ffi.include_dir()``) and oneDNN 3.2 (the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp``
wheels, which jcv depends on for Linux x86-64). The shared library is cached under
``$JCV_CACHE_DIR`` (default ``~/.cache/jcv``)``/native``, keyed by a hash of the sources, the
flags, the jaxlib version and the oneDNN library, and built under a file lock so concurrent
processes do not race. No network is used. When anything is missing (another OS or CPU, no
compiler, no oneDNN), :func:`available` is False, jcv warns once in one line and uses XLA's
convolutions. ``JCV_ONEDNN=0`` turns the native path off.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import jax

__all__ = ["BN_TARGETS", "CONV_TARGETS", "available", "default_threads", "library_path", "require",
           "set_threads", "status", "unavailable_reason", "warn_unavailable"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = (os.path.join(_HERE, "onednn_conv.cc"), os.path.join(_HERE, "native_bn.cc"))
CONV_TARGETS = ("jcv_onednn_conv_fwd", "jcv_onednn_conv_bwd_data", "jcv_onednn_conv_bwd_weights")
BN_TARGETS = ("jcv_bn_stats", "jcv_bn_bwd_stats")
_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-w"]
_state: dict = {"lib": None, "reason": None, "warned": False, "path": None}


def _prefixes() -> list[str]:
  """Where pip puts the oneDNN wheels' lib/ and include/ (venv, base, --user), then the system."""
  import site
  env = os.environ.get("JCV_ONEDNN_ROOT")
  out = [env] if env else []
  out += [sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None) or "", "/usr/local", "/usr"]
  return [p for i, p in enumerate(out) if p and p not in out[:i]]


def _find_onednn() -> tuple[str, str]:
  """(library file, include dir) of oneDNN 3.x, or raises RuntimeError."""
  for prefix in _prefixes():
    inc = os.path.join(prefix, "include")
    for libdir in ("lib", "lib64", "lib/x86_64-linux-gnu"):
      lib = os.path.join(prefix, libdir, "libdnnl.so.3")
      if os.path.exists(lib) and os.path.exists(os.path.join(inc, "oneapi", "dnnl", "dnnl.hpp")):
        return os.path.realpath(lib), inc
  raise RuntimeError("oneDNN 3 not found (pip install onednn-cpu-gomp==2023.2.0 "
                     "onednn-devel-cpu-gomp==2023.2.0)")


def _cache_dir() -> str:
  base = os.environ.get("JCV_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jcv")
  return os.path.join(base, "native")


def _build(lib: str, inc: str) -> str:
  """Compiles the handlers (once per key) and returns the shared library's path."""
  import jaxlib
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not compiler:
    raise RuntimeError("no C++ compiler (g++) on PATH")
  sources = []
  for name in _SOURCES:
    with open(name, "rb") as f:
      sources.append(f.read())
  key = hashlib.sha256(b"\0".join([
      *sources, " ".join(_FLAGS).encode(), jaxlib.__version__.encode(), lib.encode(),
      str(os.path.getsize(lib)).encode(), compiler.encode(), sysconfig.get_platform().encode(),
  ])).hexdigest()[:16]
  out_dir = _cache_dir()
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"onednn_conv-{key}.so")
  if os.path.exists(path):
    return path
  import fcntl
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key
    if os.path.exists(path):
      return path
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{inc}", *_SOURCES, lib,
           f"-Wl,-rpath,{os.path.dirname(lib)}", "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
      os.unlink(tmp)
      last = (proc.stderr.strip().splitlines() or ["?"])[-1]
      raise RuntimeError(f"compiling {', '.join(map(os.path.basename, _SOURCES))} failed: {last[:200]}")
    os.replace(tmp, path)
  return path


def _load():
  if _state["lib"] is not None or _state["reason"] is not None:
    return _state["lib"]
  try:
    if os.environ.get("JCV_ONEDNN", "1").lower() in ("0", "false", "no", "off"):
      raise RuntimeError("disabled by JCV_ONEDNN=0")
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
      raise RuntimeError(f"needs Linux x86-64, this is {platform.system()} {platform.machine()}")
    lib, inc = _find_onednn()
    path = _build(lib, inc)
    handle = ctypes.CDLL(path)
    for name in CONV_TARGETS + BN_TARGETS:
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
