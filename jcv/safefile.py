"""Files jcv writes in a run folder, opened without following symbolic links.

Every file jcv writes in a work directory (the lock, metrics.jsonl, config.json,
class_names.json, run.json, results.json, figures, the run marker) goes through this module:
an existing path that is a symbolic link (or not a regular file) is refused with
:class:`UnsafeFileError` naming it, so a link planted in a run folder can never make jcv
truncate or append to the file it points at. Whole files are written atomically (a fresh
temporary file, created exclusively, then renamed over the name).

``RUN_MARKER`` is the empty file jcv creates in each run folder it starts: only a folder
holding it is a jcv run (``--restart`` moves only such folders; image folders skip them).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import stat

__all__ = ["RUN_MARKER", "UnsafeFileError", "pid_alive", "open_fd", "open_append", "write_atomic", "write_json",
           "is_run_folder", "mark_run_folder"]

RUN_MARKER = ".jcv-run"
_NOFOLLOW = os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class UnsafeFileError(ValueError):
  """A file jcv was to write is a symbolic link or not a regular file."""


def _refuse(path, what: str) -> UnsafeFileError:
  return UnsafeFileError(f"refusing to write {path}: it is {what}; jcv writes its run files only as "
                         "regular files (remove it, or use another --workdir)")


def pid_alive(pid: int) -> bool:
  """Whether process ``pid`` exists (a process of another user counts)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def open_fd(path, flags: int, mode: int = 0o644) -> int:
  """``os.open(path, flags | O_NOFOLLOW)`` of a regular file; a link or other kind is refused."""
  try:
    fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, mode)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise _refuse(path, "a symbolic link") from None
    if e.errno == errno.ENXIO:  # a FIFO without a reader
      raise _refuse(path, "not a regular file") from None
    raise
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise _refuse(path, "not a regular file")
  os.set_blocking(fd, True)
  return fd


def open_append(path, *, encoding: str = "utf-8"):
  """A text file object appending to ``path`` (created if missing), links refused."""
  fd = open_fd(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  return os.fdopen(fd, "a", encoding=encoding)


def write_atomic(path, data: bytes | str) -> pathlib.Path:
  """Replaces ``path`` with ``data`` at once (a fresh temporary file renamed over it).

  A ``path`` that exists as a symbolic link or a non-regular file is refused."""
  path = pathlib.Path(path)
  try:
    st = os.lstat(path)
  except FileNotFoundError:
    st = None
  if st is not None and stat.S_ISLNK(st.st_mode):
    raise _refuse(path, "a symbolic link")
  if st is not None and not stat.S_ISREG(st.st_mode):
    raise _refuse(path, "not a regular file")
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with contextlib.suppress(FileNotFoundError):
    os.unlink(tmp)
  fd = open_fd(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  return path


def write_json(path, obj, *, indent: int = 2, default=None) -> pathlib.Path:
  """``obj`` as indented JSON, written with :func:`write_atomic`."""
  return write_atomic(path, json.dumps(obj, indent=indent, default=default) + "\n")


def is_run_folder(folder) -> bool:
  """Whether ``folder`` holds jcv's run marker (it is, or was, a jcv run's work directory)."""
  try:
    return stat.S_ISREG(os.lstat(pathlib.Path(folder) / RUN_MARKER).st_mode)
  except OSError:
    return False


def mark_run_folder(folder) -> None:
  """Creates the run marker in ``folder`` (a link in its place is refused)."""
  os.close(open_fd(pathlib.Path(folder) / RUN_MARKER, os.O_WRONLY | os.O_CREAT))
