"""A private ``JCV_CACHE_DIR`` for script subprocesses that already holds the native library."""
import pathlib
import shutil


def private_cache(folder) -> str:
  """``folder/cache``: a fresh jcv cache (no compiled XLA programs) whose ``native/`` holds a copy
  of the oneDNN library this test process loaded, so each script run skips the C++ build; without
  that library (no compiler), an empty folder."""
  from jcv.kernels import native
  cache = pathlib.Path(folder) / "cache"
  cache.mkdir(mode=0o700, exist_ok=True)
  lib = native.library_path()
  if lib:
    (cache / "native").mkdir(mode=0o700, exist_ok=True)
    shutil.copy2(lib, cache / "native")
  return str(cache)
