"""CPU performance setup for jcv processes: XLA flags, host devices, glibc malloc tuning.

JAX on a CPU leaves speed on the table in three places that a library cannot fix from inside
a jitted function:

* **one XLA device per process.** XLA:CPU runs each convolution on one core. With
  ``host_devices=N`` (``--xla_force_host_platform_device_count``) and jcv's data-parallel
  step (``jcv.train.parallel``: the batch is split over a ``data`` mesh axis), each device
  runs its share of every layer on its own core.
* **page faults.** XLA:CPU allocates its temporary arena (hundreds of MB for a CNN training
  step) at every execution; glibc serves large blocks with fresh ``mmap`` pages that the
  kernel must fault in and zero each time. ``tune_malloc`` keeps freed memory in the heap
  (``mallopt``: one arena, no mmap for large blocks, no trimming at any size). A
  MobileNetV2 training step at 160 px and batch 128 frees ~3.5 GB at its end: with a 2 GB
  trim threshold glibc gave it back and the next step faulted in 865k pages again (1.3-1.9 s
  of system time per step); without trimming it runs in 1.34 s instead of 2.2 s. Memory is
  then not returned to the OS until the process exits, which suits a training process.
* **compile time.** ``enable_compilation_cache`` turns on JAX's persistent cache.

Call :func:`setup_cpu` at the very start of a program, before anything initialises a JAX
backend (flags are read once). It never overrides a flag already in ``$XLA_FLAGS``.
The convolution lowerings themselves live in :mod:`jcv.kernels`. With the native
oneDNN lowering (:mod:`jcv.kernels.onednn`), each convolution uses ``cores / host_devices``
OpenMP threads, so the device count chosen here also sets how the cores are shared.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import warnings

from jcv.trusted import ensure_trusted_dir

__all__ = ["backend_initialized", "bfloat16_is_fast", "compilation_cache_dir", "cpu_has_bfloat16", "cpu_only",
           "enable_compilation_cache", "setup_cpu", "trim_heap", "tune_malloc"]

BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of bfloat16 dot-product units

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8


def backend_initialized() -> bool:
  """True once a JAX backend exists (XLA flags set after that have no effect)."""
  try:
    from jax._src import xla_bridge
    return bool(xla_bridge.backends_are_initialized())
  except Exception:  # private API moved: assume the safe answer
    return False


def cpu_only() -> bool:
  """True when JAX will run on the CPU alone, answered without initialising a backend:
  ``jax_platforms`` (``$JAX_PLATFORMS``) names only ``cpu``, or no accelerator plugin (a
  ``jax_plugins`` entry point or module, ``libtpu``) is installed."""
  import importlib.metadata
  import importlib.util
  import pkgutil
  import jax
  platforms = [p.strip() for p in (jax.config.jax_platforms or "").split(",") if p.strip()]
  if platforms:
    return set(platforms) == {"cpu"}
  if backend_initialized():
    return jax.default_backend() == "cpu"
  if list(importlib.metadata.entry_points(group="jax_plugins")) or importlib.util.find_spec("libtpu"):
    return False
  try:
    import jax_plugins
  except ImportError:
    return True
  return not any(pkgutil.iter_modules(jax_plugins.__path__))


def cpu_has_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX), from Linux's
  ``/proc/cpuinfo`` (False where it cannot be read)."""
  try:
    with open(cpuinfo) as f:
      flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
  except OSError:
    return False
  return any(flag in flags for flag in BFLOAT16_CPU_FLAGS)


def bfloat16_is_fast() -> bool:
  """Whether bfloat16 compute pays on JAX's default backend: any accelerator, or a CPU with
  bfloat16 units (:func:`cpu_has_bfloat16`) and jcv's oneDNN kernels (their bfloat16
  convolutions; XLA's own CPU convolutions gain nothing from it). Initialises the backend."""
  import jax
  if jax.default_backend() != "cpu":
    return True
  from jcv.kernels import native
  return cpu_has_bfloat16() and native.available()


def _libc():
  return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def tune_malloc() -> bool:
  """Keeps freed memory in glibc's heap so XLA's per-step buffers reuse mapped pages.

  Linux/glibc only (returns False elsewhere, and changes nothing). Call it before JAX
  initialises a backend: the one-arena limit only binds threads that have not allocated yet,
  and XLA's threads started earlier keep arenas of their own, whose blocks above 64 MB glibc
  maps and unmaps at every use (a program with a 512 MB temporary: 147k page faults per call
  when tuned after `jax.devices()`, 1 when tuned before). glibc fixes its arena limit when a
  second thread first allocates, so only ``MALLOC_ARENA_MAX=1`` in the environment is certain.
  """
  if platform.system() != "Linux":
    return False
  try:
    mallopt = _libc().mallopt
  except (OSError, AttributeError):
    return False
  ok = True
  # M_TRIM_THRESHOLD -1 is SIZE_MAX in glibc (never trim); INT_MAX still trims frees above 2 GB.
  for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
                       (_M_TOP_PAD, 64 << 20)):
    ok &= mallopt(param, value) == 1
  return bool(ok)


def trim_heap() -> bool:
  """Hands glibc's free heap memory back to the kernel (``malloc_trim(0)``), which
  :func:`tune_malloc` otherwise keeps for the next step: for after a one-off peak, such as
  ``run.devices="auto"`` timing the step on two meshes (MobileNetV2 at batch 128 kept 11 GB).
  False where there is no glibc."""
  if platform.system() != "Linux":
    return False
  try:
    return bool(_libc().malloc_trim(0))
  except (OSError, AttributeError):
    return False


def _add_flag(flags: list[str], flag: str) -> None:
  name = flag.split("=", 1)[0]
  if not any(f.split("=", 1)[0] == name for f in flags):
    flags.append(flag)


def setup_cpu(*, host_devices: int | str | None = None, malloc: bool = True, devices_per_core: int = 1) -> dict:
  """Prepares this process for fast CPU training; call before the first JAX computation.

  ``host_devices``: number of XLA CPU devices (``None`` leaves it alone; ``"cores"`` or 0
  uses ``os.cpu_count()`` rounded down to a power of two, so batch sizes divide, times
  ``devices_per_core``: 2 keeps both cores busy while one device waits on a collective or a
  single-threaded op; whether that pays depends on the model (docs/benchmarks.md), so measure). Use with
  jcv's data-parallel step so each device gets a share of the batch; the per-device batch
  must divide evenly. ``malloc``: apply :func:`tune_malloc`.
  Flags already present in ``$XLA_FLAGS`` win. Returns what was done.
  """
  done = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "malloc": False}
  if malloc:
    done["malloc"] = tune_malloc()
  if host_devices is not None:
    if devices_per_core < 1:
      raise ValueError(f"devices_per_core must be >= 1, got {devices_per_core!r}")
    if host_devices in (0, "cores"):
      cores = os.cpu_count() or 1
      count = (1 << (cores.bit_length() - 1)) * devices_per_core
    else:
      count = int(host_devices)
    if count < 1:
      raise ValueError(f"host_devices must be >= 1 (or 'cores'), got {host_devices!r}")
    if backend_initialized():
      warnings.warn("jcv.perf.setup_cpu: a JAX backend is already initialised; the XLA flags "
                    "take effect only in a new process", RuntimeWarning, stacklevel=2)
    flags = os.environ.get("XLA_FLAGS", "").split()
    _add_flag(flags, f"--xla_force_host_platform_device_count={count}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    done["xla_flags"] = os.environ["XLA_FLAGS"]
  return done


def compilation_cache_dir() -> str:
  """The user's own cache of compiled XLA programs: ``$JCV_COMPILATION_CACHE`` if set, else
  ``$XDG_CACHE_HOME/jcv/jax``, else ``~/.cache/jcv/jax``. Never a folder next to a workdir:
  executables loaded from a place others can write to would be code others can change."""
  env = os.environ.get("JCV_COMPILATION_CACHE")
  if env:
    return os.path.expanduser(env)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jcv", "jax")


def _private_dir(path: str) -> None:
  """Creates ``path`` (mode 0700) and refuses one that another user could write to
  (:func:`jcv.trusted.untrusted_dir_reason`: the folder and every parent)."""
  reason = ensure_trusted_dir(path)
  if reason is not None:
    raise PermissionError(f"compilation cache {path} is not private: {reason}; use a private "
                          "folder (chmod go-w, or $JCV_COMPILATION_CACHE)")


def enable_compilation_cache(path: str | os.PathLike | None = None, *,
                             min_compile_time_s: float = 0.5) -> str:
  """Turns on JAX's persistent compilation cache at ``path`` (default
  :func:`compilation_cache_dir`, e.g. ``~/.cache/jcv/jax``).

  Compiling a CNN training step takes tens of seconds on a small CPU; later runs of the same
  program and shapes load it from the cache instead. Returns the directory used.
  """
  import jax
  path = os.fspath(path) if path is not None else compilation_cache_dir()
  _private_dir(path)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  return path
