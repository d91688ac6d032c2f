"""Compiles jcv's native library (``onednn_conv.cc``, ``onednn_ffi.cc``, ``depthwise_grad.cc``,
``native_bn.cc``) and finds it a safe home.

The C++ files are compiled with the system's ``g++`` (``$CXX``) against jaxlib's FFI headers
(``jax.ffi.include_dir()``) and oneDNN 3.2 (the ``onednn-cpu-gomp`` / ``onednn-devel-cpu-gomp``
wheels). The library is cached in ``$JCV_CACHE_DIR`` (default ``$XDG_CACHE_HOME/jcv`` or
``~/.cache/jcv``)``/native`` as ``onednn_conv-<key>.so``, the key a hash of the sources, the
flags, the jaxlib version, the oneDNN library and the compiler. Builds run under one file lock
per folder, write a temporary file that is removed on any error or interrupt, and remove the
temporaries a killed build left behind.

Loaded code must come from a folder only the user can write (:mod:`jcv.trusted`): when the
cache folder is not one, the library is built into a fresh private temporary folder (one
warning saying why), loaded from there and the folder removed.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from typing import Iterator

import jax

from jcv.trusted import ensure_trusted_dir, untrusted_dir_reason, untrusted_file_reason

__all__ = ["built_library", "cache_dir", "find_onednn"]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCES = tuple(os.path.join(_HERE, f) for f in (
    "onednn_conv.cc", "onednn_ffi.cc", "depthwise_grad.cc", "native_bn.cc"))
_HEADERS = (os.path.join(_HERE, "onednn_conv.h"),)  # hashed into the library's key with the sources
_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fvisibility=hidden", "-w"]
# Build temporaries in the cache folder: ".build-*.so", and "tmp*.so" (mkstemp's default name).
_TEMP_PATTERNS = (".build-*.so", "tmp*.so")


def _prefixes() -> list[str]:
  """Where pip puts the oneDNN wheels' lib/ and include/ (venv, base, --user), then the system."""
  import site
  env = os.environ.get("JCV_ONEDNN_ROOT")
  out = [env] if env else []
  out += [sys.prefix, sys.base_prefix, getattr(site, "USER_BASE", None) or "", "/usr/local", "/usr"]
  return [p for i, p in enumerate(out) if p and p not in out[:i]]


def find_onednn() -> tuple[str, str]:
  """(library file, include dir) of oneDNN 3.x, or raises RuntimeError."""
  for prefix in _prefixes():
    inc = os.path.join(prefix, "include")
    for libdir in ("lib", "lib64", "lib/x86_64-linux-gnu"):
      lib = os.path.join(prefix, libdir, "libdnnl.so.3")
      if os.path.exists(lib) and os.path.exists(os.path.join(inc, "oneapi", "dnnl", "dnnl.hpp")):
        return os.path.realpath(lib), inc
  raise RuntimeError("oneDNN 3 not found (pip install onednn-cpu-gomp==2023.2.0 "
                     "onednn-devel-cpu-gomp==2023.2.0)")


def cache_dir() -> str:
  """The folder the library is cached in."""
  base = os.environ.get("JCV_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jcv")
  return os.path.join(base, "native")


def _library_name(compiler: str, lib: str) -> str:
  import jaxlib
  sources = []
  for name in _SOURCES + _HEADERS:
    with open(name, "rb") as f:
      sources.append(f.read())
  key = hashlib.sha256(b"\0".join([
      *sources, " ".join(_FLAGS).encode(), jaxlib.__version__.encode(), lib.encode(),
      str(os.path.getsize(lib)).encode(), compiler.encode(), sysconfig.get_platform().encode(),
  ])).hexdigest()[:16]
  return f"onednn_conv-{key}.so"


def _compile(compiler: str, lib: str, inc: str, out: str) -> None:
  cmd = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{inc}", *_SOURCES, lib,
         f"-Wl,-rpath,{os.path.dirname(lib)}", "-o", out]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode:
    last = (proc.stderr.strip().splitlines() or ["?"])[-1]
    raise RuntimeError(f"compiling {', '.join(map(os.path.basename, _SOURCES))} failed: {last[:200]}")
  os.chmod(out, 0o700)


def _ready(path: str) -> bool:
  return os.path.exists(path) and untrusted_file_reason(path) is None


def _cached(out_dir: str, name: str, compiler: str, lib: str, inc: str) -> str:
  """The library in the (trusted) cache folder, built there first if needed."""
  import fcntl
  path = os.path.join(out_dir, name)
  if _ready(path):
    return path
  fd = os.open(os.path.join(out_dir, ".build.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
  with os.fdopen(fd, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building
    if _ready(path):
      return path
    for pattern in _TEMP_PATTERNS:  # left by a build that was killed while holding the lock
      for stale in glob.glob(os.path.join(out_dir, pattern)):
        os.unlink(stale)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
      _compile(compiler, lib, inc, tmp)
      os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: no temporary left behind
      with contextlib.suppress(OSError):
        os.unlink(tmp)
      raise
  return path


@contextlib.contextmanager
def built_library(lib: str, inc: str) -> Iterator[str]:
  """Yields the path of the compiled library, to load inside the ``with``.

  From the cache folder when only this user can write it; else built into a private
  temporary folder (one warning naming the reason) that is removed afterwards (a loaded
  library stays mapped). Raises RuntimeError when no compiler is found or no safe place exists.
  """
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if not compiler:
    raise RuntimeError("no C++ compiler (g++) on PATH")
  name = _library_name(compiler, lib)
  out_dir = cache_dir()
  try:
    reason = ensure_trusted_dir(out_dir)
  except OSError as e:
    reason = f"{out_dir} cannot be created ({e.strerror})"
  if reason is None:
    path = _cached(out_dir, name, compiler, lib, inc)
    yield _checked(path)
    return
  warnings.warn(f"jcv: not loading native code from {out_dir}: {reason}; building it in a "
                "private temporary folder", RuntimeWarning, stacklevel=4)
  private = tempfile.mkdtemp(prefix="jcv-native-")
  try:
    unsafe = untrusted_dir_reason(private)
    if unsafe is not None:
      raise RuntimeError(f"no private folder to build the native library in: {unsafe}")
    path = os.path.join(private, name)
    _compile(compiler, lib, inc, path)
    yield _checked(path)
  finally:
    shutil.rmtree(private, ignore_errors=True)


def _checked(path: str) -> str:
  reason = untrusted_file_reason(path)
  if reason is not None:
    raise RuntimeError(f"not loading native code: {reason}")
  return path
