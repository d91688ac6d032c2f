"""Checks a weight file before it is read: the right kind, complete, finite.

Damaged files otherwise surface as low-level errors that do not name the file (a bare
``BadZipFile``, numpy's "pickled data" for random bytes, h5py's ``OSError``); here each is one
ValueError saying which file, what is wrong with it and what to do.
"""
from __future__ import annotations

import pathlib
import zipfile

import numpy as np

__all__ = ["check_weight_file"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_FIX = "download or export it again"


def check_weight_file(path) -> None:
  """Raises ValueError unless ``path`` is a complete .npz (zip of .npy, no pickles) or HDF5
  file whose float arrays are all finite."""
  path = pathlib.Path(path)
  suffix = path.suffix.lower()
  with open(path, "rb") as f:
    head = f.read(8)
  if not head:
    raise ValueError(f"weight file {path} is empty; {_FIX}")
  if suffix == ".npz":
    if not head.startswith(b"PK"):
      raise ValueError(f"weight file {path} is not a .npz (zip) archive (it starts with {head[:4]!r}); {_FIX}")
    try:
      with zipfile.ZipFile(path) as z:
        bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
      raise ValueError(f"weight file {path} is a truncated or damaged .npz ({e}); {_FIX}") from None
    if bad is not None:
      raise ValueError(f"weight file {path} is damaged (entry {bad} fails its checksum); {_FIX}")
    try:
      with np.load(path, allow_pickle=False) as data:
        _check_finite(path, ((n, data[n]) for n in data.files))
    except ValueError as e:
      if "weight file" in str(e):
        raise
      raise ValueError(f"weight file {path} holds something other than plain arrays ({e}); "
                       "jcv never unpickles weight files") from None
  elif suffix in (".h5", ".hdf5", ".keras"):
    if head != _HDF5_MAGIC:
      raise ValueError(f"weight file {path} is not an HDF5 file (it starts with {head[:4]!r}); {_FIX}")
    try:
      import h5py
      with h5py.File(path, "r") as f:
        items = []
        f.visititems(lambda name, obj: items.append((name, obj[()])) if isinstance(obj, h5py.Dataset) else None)
    except ImportError:
      return
    except (OSError, KeyError, ValueError) as e:
      raise ValueError(f"weight file {path} is a truncated or damaged HDF5 file ({e}); {_FIX}") from None
    _check_finite(path, items)


def _check_finite(path, items) -> None:
  bad = [name for name, a in items
         if np.issubdtype(np.asarray(a).dtype, np.floating) and not np.all(np.isfinite(a))]
  if bad:
    raise ValueError(f"weight file {path} has NaN or infinite values in {len(bad)} array(s) "
                     f"({', '.join(bad[:5])}); {_FIX}")
