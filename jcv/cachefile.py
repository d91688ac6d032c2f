"""Cache files that heal: verified on load, rebuilt when damaged, skipped when unwritable.

Every on-disk cache of jcv (decoded images of an image folder, frozen-bottom features) is a
group of files loaded with :func:`load` and written with :func:`save`:

* a file that fails to load (truncated, empty, garbage) is one warning naming it; the group
  is removed and the caller rebuilds it;
* the files are written under temporary names (``.<name>.<pid>.tmp<suffix>``) and renamed in
  order, so the last one marks the group complete; temporary files left by a killed process
  are removed by the next save in that folder;
* a cache that cannot be written (read-only filesystem, no permission, disk full) is one
  warning, and the run goes on without it.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import warnings
import zipfile
from typing import Callable, Sequence

from jcv import safefile

__all__ = ["load", "save", "clean_stale"]

_TMP = re.compile(r"\.(\d+)\.tmp(\.|$)")
_DAMAGED = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


def load(read: Callable, paths: Sequence, *, what: str):
  """``read()`` when every file of ``paths`` exists, else None. A group that fails to read is
  removed, with one warning naming the file, and None returned (the caller rebuilds it)."""
  paths = [pathlib.Path(p) for p in paths]
  if not all(p.is_file() for p in paths):
    return None
  try:
    return read()
  except _DAMAGED as e:
    warnings.warn(f"the {what} cache {paths[-1]} (or a file beside it) is damaged "
                  f"({type(e).__name__}: {e}); rebuilding it")
    for p in paths:
      with contextlib.suppress(OSError):
        os.unlink(p)
    return None


def _tmp_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")


def save(write: Callable, paths: Sequence, *, what: str) -> bool:
  """``write(temporary_paths)`` writes each file of ``paths`` under a temporary name; they are
  then renamed in order. False (one warning, nothing left behind) when the folder cannot be
  written."""
  paths = [pathlib.Path(p) for p in paths]
  tmps = [_tmp_path(p) for p in paths]
  try:
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    clean_stale(paths[0].parent)
    write(tmps)
    for tmp, path in zip(tmps, paths):
      os.replace(tmp, path)
    return True
  except OSError as e:
    for tmp in tmps:
      with contextlib.suppress(OSError):
        os.unlink(tmp)
    warnings.warn(f"cannot write the {what} cache in {paths[0].parent} ({e.strerror or e}); "
                  "going on without it")
    return False


def clean_stale(folder) -> list[pathlib.Path]:
  """Removes the temporary files in ``folder`` whose writing process is gone -> their paths."""
  removed = []
  for entry in os.scandir(folder):
    m = _TMP.search(entry.name)
    if m and entry.is_file(follow_symlinks=False) and not safefile.pid_alive(int(m.group(1))):
      with contextlib.suppress(OSError):
        os.unlink(entry.path)
        removed.append(pathlib.Path(entry.path))
  return removed
