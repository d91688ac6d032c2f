"""The image-folder layout: which files, labels and classes make up a split of a folder.

``root/<split>/<class>/<file>`` or ``root/<class>/<file>``; a split may carry a slice
(``"train[:90%]"``, ``"test[100:]"``) and a stratified, seeded validation part may be carved
out of the training files. Only listing happens here (no decoding): the source objects built
from these lists are in :mod:`jcv.data.sources`.
"""
from __future__ import annotations

import os
import pathlib
import re

import numpy as np

from jcv import safefile
from jcv.data.decode import IMAGE_EXTENSIONS

__all__ = ["list_classes", "list_split", "looks_like_image_folder"]

def list_split(root_path: pathlib.Path, split: str | None, *, val_fraction: float | None = None,
               seed: int = 0) -> tuple[list[str], np.ndarray, list[str]]:
  """(file paths, int32 labels, class names) of ``split`` of the image folder ``root_path``.

  Classes are the sub-folder names sorted, taken from ``root_path/train`` when it exists so
  train and test labels agree. ``val_fraction`` carves a stratified, seeded validation set
  out of the training files (``split="train"`` is the rest, ``split="val"`` the carved part).
  Unknown splits, empty class folders and empty results are ``ValueError``s naming the folder.
  """
  name, sl = _parse_split(split) if split is not None else (None, slice(None))
  if val_fraction is not None and not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1); got {val_fraction}")

  folder, carve, has_splits = _split_folder(root_path, name, val_fraction)

  class_dir = root_path / "train" if has_splits and (root_path / "train").is_dir() else folder
  class_names = list_classes(class_dir)
  if not class_names:
    raise ValueError(f"no class sub-folders in {str(class_dir)!r}: expected <class>/<image files>")
  extra = set(list_classes(folder)) - set(class_names)
  if extra:
    raise ValueError(f"classes {sorted(extra)} in {str(folder)!r} are missing from {str(class_dir)!r}")
  paths, labels = _list_files(folder, class_names)
  if not paths:
    raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(folder)!r}")
  labels = np.asarray(labels, np.int32)
  if carve is not None:
    is_val = _carve(labels, val_fraction, seed)
    keep = is_val if carve == "val" else ~is_val
    paths = [p for p, k in zip(paths, keep) if k]
    labels = labels[keep]
  idx = range(len(paths))[slice(_resolve_bound(sl.start, len(paths)), _resolve_bound(sl.stop, len(paths)))]
  paths, labels = [paths[i] for i in idx], labels[list(idx)]
  if not paths:
    raise ValueError(f"split {split!r} of {str(root_path)!r} holds no images (too few files to carve or slice it)")
  return paths, labels, class_names


_SLICE_RE = re.compile(r"^(?P<name>[^\[\]]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


def _parse_split(split: str) -> tuple[str, slice]:
  """"train[:90%]" -> ("train", slice) over the example count (percent or absolute)."""
  m = _SLICE_RE.match(split.strip())
  if not m:
    raise ValueError(f"bad split {split!r}: expected a name like 'train', 'train[:90%]' or 'test[100:]'")
  return m.group("name"), slice(m.group("start"), m.group("stop"))


def _resolve_bound(bound: str | None, n: int) -> int | None:
  if bound is None:
    return None
  if bound.endswith("%"):
    pct = int(bound[:-1])
    if not -100 <= pct <= 100:
      raise ValueError(f"split percentage {bound} out of [-100%, 100%]")
    return int(round(n * pct / 100))
  return int(bound)


def list_classes(folder: pathlib.Path) -> list[str]:
  """Sub-folder names, sorted; hidden folders and jcv run folders (a workdir inside) are no classes."""
  return sorted(p.name for p in folder.iterdir()
                if p.is_dir() and not p.name.startswith(".") and not safefile.is_run_folder(p))


def _list_files(folder: pathlib.Path, class_names: list[str]) -> tuple[list[str], list[int]]:
  paths, labels, empty = [], [], []
  for label, name in enumerate(class_names):
    cdir = folder / name
    if not cdir.is_dir():
      continue
    files = sorted(
      f for f in os.listdir(cdir)
      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not files:
      empty.append(name)
    paths.extend(str(cdir / f) for f in files)
    labels.extend([label] * len(files))
  if empty and paths:
    raise ValueError(f"class folder(s) {empty} under {str(folder)!r} hold no image files "
                     f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove the folder(s)")
  return paths, labels


def _carve(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
  """Boolean mask of a stratified validation subset (``val_fraction`` of each class)."""
  rng = np.random.default_rng(seed)
  is_val = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    k = int(round(len(idx) * val_fraction))
    is_val[rng.permutation(idx)[:k]] = True
  return is_val


def _split_folder(root_path: pathlib.Path, name: str | None, val_fraction):
  """(folder to list, "train"/"val" part to carve from it or None, whether root has split folders)."""
  has_splits = (root_path / "train").is_dir() or (name is not None and (root_path / name).is_dir())
  carve = None
  if name is None:
    folder = root_path
  elif (root_path / name).is_dir() and not (name == "train" and val_fraction):
    folder = root_path / name
  elif name in ("train", "val", "validation"):
    if not val_fraction:
      raise ValueError(
        f"split {name!r} not found under {str(root_path)!r}: pass val_fraction=... to carve a "
        "validation set out of the training images")
    folder = root_path / "train" if has_splits else root_path
    carve = "val" if name in ("val", "validation") else "train"
  else:
    found = list_classes(root_path) if root_path.is_dir() else []
    raise ValueError(f"split {name!r} not found under {str(root_path)!r} (sub-folders: {found})")
  return folder, carve, has_splits


def looks_like_image_folder(root: pathlib.Path, depth: int = 3) -> bool:
  """True if image files lie within ``depth`` levels under ``root`` (a quick, bounded look)."""
  try:
    entries = list(os.scandir(root))[:200]
  except OSError:
    return False
  for e in entries:
    if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS):
      return True
  return depth > 1 and any(e.is_dir() and not e.name.startswith(".")
                           and looks_like_image_folder(pathlib.Path(e.path), depth - 1) for e in entries[:20])
