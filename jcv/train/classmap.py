"""Evaluating a run on data whose classes must be the run's: checked by name, never by position."""
from __future__ import annotations

import sys

import numpy as np

__all__ = ["align_classes"]


class _Relabeled:
  """A source whose labels are mapped through ``mapping`` (data index -> run index)."""

  def __init__(self, source, mapping, class_names):
    self.source, self.mapping, self.class_names = source, np.asarray(mapping, np.int32), list(class_names)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    rec = dict(self.source[i])
    rec["label"] = int(self.mapping[rec["label"]])
    return rec

  def load(self, i, **kwargs):
    rec = dict(self.source.load(i, **kwargs)) if hasattr(self.source, "load") else dict(self.source[i])
    rec["label"] = int(self.mapping[rec["label"]])
    return rec


def align_classes(source, run_names, *, what: str = "the data", quiet: bool = False):
  """``source`` with labels in the run's class order.

  Same names in the same order: ``source`` itself. The data's classes a subset of the run's
  (or the same in another order): labels mapped by name, with a note on stderr. A class the
  run does not know: ValueError naming it. Unnamed classes on either side are not checked.
  """
  data_names = list(getattr(source, "class_names", []) or [])
  run_names = list(run_names or [])
  if not data_names or not run_names or data_names == run_names:
    return source
  unknown = [n for n in data_names if n not in run_names]
  if unknown:
    raise ValueError(
        f"the classes of {what} do not match the run's (class_names.json): {unknown} are not among the "
        f"run's {len(run_names)} classes {run_names[:10]}{' ...' if len(run_names) > 10 else ''}; "
        "evaluate on data with the run's classes (or a subset of them)")
  mapping = [run_names.index(n) for n in data_names]
  if not quiet:
    missing = len(run_names) - len(data_names)
    print(f"note: {what} has {len(data_names)} of the run's {len(run_names)} classes"
          + (f" ({missing} absent)" if missing else " in another order")
          + "; labels are mapped to the run's classes by name", file=sys.stderr)
  from jcv.data.sources import ArraySource, ImageFolderSource
  labels = getattr(source, "labels", None)
  if isinstance(source, ArraySource):
    return ArraySource(source.images, np.asarray(mapping, np.int32)[source.labels], class_names=run_names,
                       skipped=source.skipped)
  if isinstance(source, ImageFolderSource) and labels is not None:
    out = ImageFolderSource(source.paths, np.asarray(mapping, np.int32)[labels], run_names, root=source.root,
                            max_pixels=source.max_pixels)
    out.skipped = list(source.skipped)
    return out
  return _Relabeled(source, mapping, run_names)
