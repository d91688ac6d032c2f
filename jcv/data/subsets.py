"""Smaller copies of a source, for quick runs and smoke tests."""
from __future__ import annotations

import numpy as np

from jcv.data.sources import ArraySource

__all__ = ["subset"]


def subset(source, limit: int, *, seed: int = 0, size: int | None = None) -> ArraySource:
  """A seeded random subset of ``limit`` records of ``source`` as an in-memory ArraySource
  (every class it draws), each image resized to ``size`` x ``size`` (bilinear) when given."""
  from PIL import Image
  if limit < 1:
    raise ValueError(f"subset limit must be >= 1, got {limit}")
  idx = np.random.default_rng(seed).permutation(len(source))[:limit]
  records = [source[int(i)] for i in idx]
  resize = (lambda a: np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))) if size else np.asarray
  images = np.stack([resize(r["image"]) for r in records])
  return ArraySource(images, np.array([r["label"] for r in records]), class_names=source.class_names)
