"""Batch functions: batch ``i`` of a loader as a pure function of its index.

:class:`TrainBatch` builds this process's share of global training batch ``step`` from the
seeded permutation of its epoch (crops and flips drawn from (seed, epoch, position));
:class:`EvalBatch` builds batch ``b`` of this process's evaluation shard, padded and
masked. Both load records through :class:`Batcher`, which decodes JPEGs at a draft size and
replaces or masks corrupt files (``strict=True`` raises
:class:`~jcv.data.decode.CorruptImageError` instead). :mod:`jcv.data.pipeline` runs them
through grain.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from jcv.data import transforms as T
from jcv.data.decode import CorruptImageError

__all__ = ["Batcher", "EvalBatch", "TrainBatch"]

log = logging.getLogger(__name__)


class Batcher:
  """Shared record loading: draft-size decoding, corrupt-file handling."""

  def __init__(self, source, *, strict: bool, draft_size: int | None):
    self.source = source
    self.strict = strict
    self.draft_size = draft_size

  def load(self, i: int) -> dict[str, Any] | None:
    """The record, or None (logged) for a corrupt file when not strict."""
    try:
      if self.draft_size is not None and hasattr(self.source, "load"):
        return self.source.load(int(i), draft_size=self.draft_size)
      return self.source[int(i)]
    except CorruptImageError as e:
      if self.strict:
        raise
      log.warning("skipping %s", e)
      return None


class TrainBatch(Batcher):
  """Batch ``step`` of the training stream (a grain map function)."""

  def __init__(self, source, *, batch_size, image_size, seed, crop, flip, scale, ratio, padding,
               process_index, process_count, steps_per_epoch, strict):
    draft = None if crop == "random_resized" else image_size
    super().__init__(source, strict=strict, draft_size=draft)
    self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
    self.crop, self.flip, self.scale, self.ratio, self.padding = crop, flip, scale, ratio, padding
    self.process_index, self.process_count = process_index, process_count
    self.steps_per_epoch = steps_per_epoch
    self._perm: tuple[int, np.ndarray] | None = None
    self._base_flip: np.ndarray | None = None

  def permutation(self, epoch: int) -> np.ndarray:
    cached = self._perm
    if cached is None or cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.source)))
      self._perm = cached
    return cached[1]

  def indices(self, step: int) -> np.ndarray:
    """Source indices of this process's share of global batch ``step``."""
    epoch, j = divmod(int(step), self.steps_per_epoch)
    start = (j * self.process_count + self.process_index) * self.batch_size
    return self.permutation(epoch)[start:start + self.batch_size]

  def flips(self, step: int, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """Which examples of the batch to mirror: random, or "alternate" (airbench): a fixed random
    half of the dataset in even epochs and the other half in odd ones."""
    if not self.flip:
      return None
    if self.flip != "alternate":
      return rng.random(len(idx)) < 0.5
    if self._base_flip is None:
      self._base_flip = np.random.default_rng([self.seed, 2]).random(len(self.source)) < 0.5
    epoch = int(step) // self.steps_per_epoch
    return self._base_flip[idx] ^ bool(epoch % 2)

  def view(self, rng: np.random.Generator, image: np.ndarray, flip: bool = False) -> np.ndarray:
    size = self.image_size
    if self.crop == "random_resized":
      image = T.random_resized_crop(rng, image, size, scale=self.scale, ratio=self.ratio)
    else:
      image = T.center_crop(T.resize_shorter(image, size), size)
      if self.crop == "pad_crop":
        image = T.pad_crop(rng, image, padding=self.padding)
    return image[:, ::-1] if flip else image

  def _vectorized(self) -> bool:
    """In-memory images already at the output size: crop/flip whole batches in numpy."""
    shape = getattr(self.source, "uniform_shape", None)
    return shape == (self.image_size, self.image_size, 3) and self.crop in ("pad_crop", "none")

  def _array_batch(self, rng: np.random.Generator, idx: np.ndarray, step: int) -> dict[str, np.ndarray]:
    images = self.source.images[idx]
    b, s = len(idx), self.image_size
    if self.crop == "pad_crop":
      p = self.padding
      padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
      windows = np.lib.stride_tricks.sliding_window_view(padded, (s, s), axis=(1, 2))  # [B, 2p+1, 2p+1, C, s, s]
      top, left = rng.integers(0, 2 * p + 1, size=(2, b))
      images = np.ascontiguousarray(windows[np.arange(b), top, left].transpose(0, 2, 3, 1))
    flip = self.flips(step, idx, rng)
    if flip is not None:
      images[flip] = images[flip, :, ::-1]
    return {"image": images, "label": self.source.labels[idx].astype(np.int32),
            "skipped": np.asarray(0, np.int32)}

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    epoch, j = divmod(int(step), self.steps_per_epoch)
    rng = np.random.default_rng([self.seed, epoch, j, self.process_index, 1])
    idx = self.indices(step)
    if self._vectorized():
      return self._array_batch(rng, idx, step)
    n = len(self.source)
    images, labels, skipped = [], [], 0
    flips = self.flips(step, idx, rng)
    for k, i in enumerate(idx):
      rec = self.load(i)
      tries = 1
      while rec is None:  # replace a corrupt file by the next good example
        if tries >= n:
          raise ValueError("every image in the source failed to decode")
        skipped += tries == 1
        rec = self.load((i + tries) % n)
        tries += 1
      images.append(self.view(rng, rec["image"], flip=flips is not None and bool(flips[k])))
      labels.append(rec["label"])
    return {"image": np.stack(images), "label": np.asarray(labels, np.int32),
            "skipped": np.asarray(skipped, np.int32)}


class EvalBatch(Batcher):
  """Batch ``b`` of this process's evaluation shard, padded and masked."""

  def __init__(self, source, *, batch_size, image_size, crop_fraction, process_index, process_count, strict):
    super().__init__(source, strict=strict, draft_size=max(image_size, round(image_size / crop_fraction)))
    self.batch_size, self.image_size, self.crop_fraction = batch_size, image_size, crop_fraction
    self.process_index, self.process_count = process_index, process_count

  def indices(self, b: int) -> np.ndarray:
    """Global source indices of batch ``b`` (-1 for padding)."""
    local = np.arange(b * self.batch_size, (b + 1) * self.batch_size)
    glob = self.process_index + self.process_count * local
    return np.where(glob < len(self.source), glob, -1)

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    size = self.image_size
    idx = self.indices(b)
    if getattr(self.source, "uniform_shape", None) == (size, size, 3):  # in memory, already the size
      valid = idx >= 0
      images = self.source.images[np.where(valid, idx, 0)]
      images[~valid] = 0
      labels = np.where(valid, self.source.labels[np.where(valid, idx, 0)], 0).astype(np.int32)
      return {"image": images, "label": labels, "mask": valid, "skipped": np.asarray(0, np.int32)}
    images = np.zeros((self.batch_size, size, size, 3), np.uint8)
    labels = np.zeros((self.batch_size,), np.int32)
    mask = np.zeros((self.batch_size,), bool)
    skipped = 0
    for k, i in enumerate(idx):
      if i < 0:
        continue
      rec = self.load(i)
      if rec is None:
        skipped += 1
        continue
      images[k] = T.eval_resize_crop(rec["image"], size, crop_fraction=self.crop_fraction)
      labels[k] = rec["label"]
      mask[k] = True
    return {"image": images, "label": labels, "mask": mask, "skipped": np.asarray(skipped, np.int32)}
