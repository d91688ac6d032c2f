"""Folders and files jcv may load code from: only the current user (or root) can change them.

jcv loads compiled code from its caches (the native library, JAX's compiled programs). A
folder is trusted when it is owned by the user and writable by nobody else, and each parent
is owned by the user or root and writable by nobody else, or sticky (``/tmp``: others may
add entries there but not rename or delete ours). A loaded file must be owned by the user
and writable by nobody else. The checks read owner ids and mode bits of the real path.
"""
from __future__ import annotations

import os
import stat

__all__ = ["ensure_trusted_dir", "untrusted_dir_reason", "untrusted_file_reason"]

_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _mode(st) -> str:
  return oct(stat.S_IMODE(st.st_mode))[2:].zfill(4)


def untrusted_dir_reason(path) -> str | None:
  """Why code in folder ``path`` could come from another user, or None if it cannot."""
  real = os.path.realpath(os.fspath(path))
  uid = os.getuid()
  try:
    st = os.stat(real)
  except OSError as e:
    return f"{real} cannot be read ({e.strerror})"
  if not stat.S_ISDIR(st.st_mode):
    return f"{real} is not a folder"
  if st.st_uid != uid:
    return f"{real} belongs to uid {st.st_uid}, not to this user (uid {uid})"
  if st.st_mode & _OTHERS_WRITE:
    return f"{real} is writable by other users (mode {_mode(st)})"
  parent = os.path.dirname(real)
  while True:
    st = os.stat(parent)
    if st.st_uid not in (uid, 0):
      return f"its parent {parent} belongs to uid {st.st_uid}"
    if st.st_mode & _OTHERS_WRITE and not st.st_mode & stat.S_ISVTX:
      return f"its parent {parent} is writable by other users (mode {_mode(st)})"
    if parent == os.path.dirname(parent):
      return None
    parent = os.path.dirname(parent)


def untrusted_file_reason(path) -> str | None:
  """Why file ``path`` could have been written by another user, or None if it cannot."""
  st = os.stat(path)
  if not stat.S_ISREG(st.st_mode):
    return f"{path} is not a regular file"
  if st.st_uid != os.getuid():
    return f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})"
  if st.st_mode & _OTHERS_WRITE:
    return f"{path} is writable by other users (mode {_mode(st)})"
  return None


def ensure_trusted_dir(path) -> str | None:
  """Creates ``path`` (new folders mode 0700) and returns :func:`untrusted_dir_reason`."""
  path = os.fspath(path)
  missing = []
  head = os.path.abspath(path)
  while not os.path.exists(head) and head != os.path.dirname(head):
    missing.append(head)
    head = os.path.dirname(head)
  for folder in reversed(missing):
    try:
      os.mkdir(folder, 0o700)
    except FileExistsError:
      pass
  return untrusted_dir_reason(path)
