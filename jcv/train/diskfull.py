"""A full disk under a run: one :class:`DiskFullError` that names the folder and the space.

Orbax writes checkpoints in background threads (asyncio event loops over tensorstore) and
tensorboardX writes events in a thread of its own. When the device fills, Orbax logs the
error from each of its threads with a traceback, tensorstore reports ``RuntimeError: Event
loop is closed`` (as an unraisable exception) for every write still in flight once Orbax has
closed the event loop of the failed save, and file objects and tensorboardX's exit handler
fail again when they flush at exit. The foreground raises the failure as one
:class:`DiskFullError`, so :func:`quiet_background_errors` drops those: log records of the
background writers' loggers, thread exceptions and unraisable exceptions caused by a full
device, the closed-loop callbacks, and, once a DiskFullError has been made (the process is
ending with it), every warning of those loggers and every thread exception. ``--debug`` shows
the DiskFullError's cause. Other errors are left alone.
"""
from __future__ import annotations

import errno
import logging
import os
import pathlib
import shutil
import sys
import threading

__all__ = ["DiskFullError", "is_disk_full", "disk_full_error", "folder_bytes", "size_text",
           "quiet_background_errors"]

_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "os_error_code='28'")
_LOGGERS = ("absl", "orbax", "asyncio", "concurrent.futures", "tensorstore")


class DiskFullError(ValueError):
  """The device holding a run folder is full; the message names the folder, the space a
  checkpoint needs, the space that is free and the step a re-run resumes from."""


def is_disk_full(exc: BaseException | None) -> bool:
  """Whether ``exc`` or an exception in its cause/context chain is a full device (ENOSPC,
  EDQUOT, or tensorstore's text of them)."""
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    if isinstance(exc, DiskFullError):
      return True
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
      return True
    if any(t in str(exc) for t in _FULL_TEXTS):
      return True
    exc = exc.__cause__ or exc.__context__
  return False


def size_text(n: float) -> str:
  """``170_000`` -> ``"166 KB"``, ``3_500_000`` -> ``"3.3 MB"`` (binary units)."""
  for unit in ("bytes", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit in ("bytes", "KB") or n >= 100 else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} TB"


def folder_bytes(folder) -> int:
  """The space the files under ``folder`` take on their device (allocated blocks)."""
  total = 0
  for root, _, files in os.walk(folder):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_blocks * 512
      except OSError:  # deleted meanwhile
        pass
  return total


def _free_bytes(folder) -> int:
  path = pathlib.Path(folder)
  while not path.exists() and path != path.parent:
    path = path.parent
  return shutil.disk_usage(path).free


def disk_full_error(folder, *, needed: int, kept_step: int | None) -> DiskFullError:
  """The one-line error of a full device holding ``folder``: a checkpoint needs ``needed``
  bytes; ``kept_step`` is the newest checkpoint on disk (None: no checkpoint yet)."""
  _RECORDS.ending = True
  free = _free_bytes(folder)
  then = (f"resume from step {kept_step} (kept)" if kept_step is not None
          else "start again (no checkpoint had been saved yet)")
  return DiskFullError(f"no space left on the device holding {folder}: a checkpoint needs about "
                       f"{size_text(needed)}, {size_text(free)} are free; free some space and re-run the "
                       f"command to {then}")


class _DiskFullRecords(logging.Filter):
  """Drops log records whose message or attached exception is a full device, and once a
  :class:`DiskFullError` has been made (the run is ending with it), every warning or error of
  the background writers (their threads then fail on the interpreter's shutdown)."""

  ending = False

  def filter(self, record):
    if self.ending and record.levelno >= logging.WARNING:
      return False
    exc = record.exc_info[1] if record.exc_info else None
    return not (is_disk_full(exc) or any(t in record.getMessage() for t in _FULL_TEXTS))


_RECORDS = _DiskFullRecords()


def _closed_loop_callback(exc, tb) -> bool:
  """A ``call_soon_threadsafe`` on a closed event loop, called straight from native code
  (tensorstore completing a write of an aborted save): its traceback is asyncio's alone."""
  if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed") or tb is None:
    return False
  return tb.tb_frame.f_code.co_name == "call_soon_threadsafe"


def quiet_background_errors() -> None:
  """Installs (once per process) the filters described in the module docstring."""
  if getattr(sys.unraisablehook, "_jcv_quiet", False):
    return
  for name in _LOGGERS:
    logging.getLogger(name).addFilter(_RECORDS)
  previous_thread_hook, previous_unraisable = threading.excepthook, sys.unraisablehook

  def thread_excepthook(args):
    if not (_RECORDS.ending or is_disk_full(args.exc_value)
            or _closed_loop_callback(args.exc_value, args.exc_traceback)):
      previous_thread_hook(args)

  def unraisablehook(unraisable):  # tensorstore reports its failed callbacks here, with no object
    if not (is_disk_full(unraisable.exc_value)
            or _closed_loop_callback(unraisable.exc_value, unraisable.exc_traceback)):
      previous_unraisable(unraisable)

  unraisablehook._jcv_quiet = True
  threading.excepthook, sys.unraisablehook = thread_excepthook, unraisablehook
