"""grain loaders: sources → host transforms → uint8 NHWC batches.

The loaders run the batch functions of :mod:`jcv.data.batches` through grain (threads,
worker processes, prefetch) and keep the iterator state for exact resume.

Each batch is a pure function of its index (seed, epoch, position), built by one
``grain.MapDataset.range(...).map(...)`` element, so batches are identical for any number
of threads or worker processes, and the iterator state is just the next batch index:
a resumed run sees exactly the batches the uninterrupted run would have seen.

Train: global seeded permutation per epoch (different each epoch); every process takes its
own ``batch_size`` slice of each global batch; the ragged tail of each epoch is dropped.
Eval: process ``p`` of ``P`` reads examples ``p, p + P, ...``; all processes yield the same
number of batches; padding examples carry ``mask=False``.

Corrupt or truncated files are replaced (train: by the next good example; eval: masked
out), logged with the file name and counted in ``iterator.num_skipped``; ``strict=True``
raises :class:`~jcv.data.decode.CorruptImageError` instead.
"""
from __future__ import annotations

import math
import os
from typing import Iterator

import grain
import numpy as np

from jcv.data.batches import EvalBatch, TrainBatch
from jcv.data.sources import ArraySource

__all__ = ["Loader", "LoaderIterator", "eval_loader", "train_loader"]

CROPS = ("random_resized", "pad_crop", "none")
_INFINITE_EPOCHS = 1 << 30


def _process_info(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # noqa: PLC0415 - only needed when not given explicitly

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, process_count={process_count}); got {process_index}")
  return int(process_index), int(process_count)


def _default_threads(source) -> int:
  if isinstance(source, ArraySource):
    return 1  # decoded already: one background thread overlaps batching with the train step
  return max(2, min(16, os.cpu_count() or 2))


def _check_common(source, batch_size, image_size):
  if not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
    raise ValueError(f"source must support len() and [i]; got {type(source).__name__}")
  if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int (per process); got {batch_size!r}")
  if not isinstance(image_size, (int, np.integer)) or image_size < 1:
    raise ValueError(f"image_size must be a positive int; got {image_size!r}")
  if len(source) == 0:
    raise ValueError("source is empty")


def _allow_grain_workers():
  """grain's worker start reads an absl flag, which raises in programs that never parsed
  flags once jax is imported (google/grain#1355, fixed upstream by #1361/#1362). Marking
  the flags parsed keeps every absl flag at its default, as grain's own config does."""
  from absl import flags  # noqa: PLC0415

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class LoaderIterator(Iterator[dict]):
  """Iterator over a :class:`Loader`; ``get_state()``/``set_state()`` for exact resume.

  The state is a small JSON-serialisable dict ``{"next_batch": int, "num_skipped": int}``.
  ``num_skipped`` counts corrupt files replaced or masked so far.
  """

  def __init__(self, loader: "Loader", start: int = 0):
    self._loader = loader
    self.num_skipped = 0
    self._it = None
    self._open(start)

  def _open(self, start: int):
    self.close()
    self._next = int(start)
    self._it = iter(self._loader._grain_dataset(self._next))

  def __next__(self) -> dict:
    batch = next(self._it)
    skipped = int(batch.pop("skipped"))
    if skipped:
      self.num_skipped += skipped
    self._next += 1
    return batch

  def __iter__(self):
    return self

  @property
  def step(self) -> int:
    """Index of the next batch this iterator yields."""
    return self._next

  def get_state(self) -> dict[str, int]:
    return {"next_batch": self._next, "num_skipped": self.num_skipped}

  def set_state(self, state: dict[str, int]) -> None:
    if not isinstance(state, dict) or "next_batch" not in state:
      raise ValueError(f"expected a state dict from get_state() with 'next_batch'; got {state!r}")
    self._open(int(state["next_batch"]))
    self.num_skipped = int(state.get("num_skipped", 0))

  def close(self) -> None:
    """Stops worker processes (if any)."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


class Loader:
  """A re-iterable grain pipeline of uint8 batches (see :func:`train_loader`, :func:`eval_loader`)."""

  def __init__(self, make_batch, num_batches: int, *, num_threads: int, num_workers: int, prefetch: int,
               source, batch_size: int, image_size: int, steps_per_epoch: int | None = None,
               infinite: bool = False):
    self._make_batch = make_batch
    self._num_batches = num_batches
    self.num_threads = num_threads
    self.num_workers = num_workers
    self.prefetch = prefetch
    self.source = source
    self.class_names = list(getattr(source, "class_names", []))
    self.batch_size = batch_size
    self.image_size = image_size
    self.steps_per_epoch = steps_per_epoch
    self.infinite = infinite

  def _grain_dataset(self, start: int):
    ds = grain.MapDataset.range(start, max(start, self._num_batches)).map(self._make_batch)
    read = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)
    ids = ds.to_iter_dataset(read)
    if self.num_workers > 0:
      _allow_grain_workers()
      ids = ids.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.num_workers, per_worker_buffer_size=2))
    return ids

  def __iter__(self) -> LoaderIterator:
    return LoaderIterator(self)

  def iter_from(self, step: int) -> LoaderIterator:
    """An iterator whose first batch is batch ``step`` (same as ``set_state``)."""
    return LoaderIterator(self, step)

  def batch_indices(self, step: int) -> np.ndarray:
    """Source indices in batch ``step`` (eval: -1 marks padding)."""
    return self._make_batch.indices(step)

  def __len__(self) -> int:
    if self.infinite:
      raise TypeError("an infinite train loader has no len(); use .steps_per_epoch")
    return self._num_batches

  def __repr__(self):
    return (f"Loader({self.source!r}, batch_size={self.batch_size}, image_size={self.image_size}, "
            f"batches={'inf' if self.infinite else self._num_batches}, threads={self.num_threads}, "
            f"workers={self.num_workers})")


def train_loader(
  source,
  *,
  batch_size: int,
  image_size: int,
  seed: int,
  crop: str = "random_resized",
  flip: bool | str = False,
  scale: tuple[float, float] = (0.08, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
  padding: int = 4,
  num_epochs: int | None = None,
  num_workers: int = 0,
  num_threads: int | None = None,
  prefetch: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  strict: bool = False,
) -> Loader:
  """Shuffled training batches ``{"image": uint8 [B, S, S, 3], "label": int32 [B]}``.

  ``batch_size`` is per process; the global batch is ``batch_size * process_count``.
  Every epoch is a fresh seeded permutation; the ragged tail is dropped
  (``steps_per_epoch = len(source) // (batch_size * process_count)``). ``crop``:
  ``"random_resized"`` (Inception scale/ratio, resized to ``image_size``), ``"pad_crop"``
  (resize + centre crop to ``image_size``, zero-pad ``padding`` and random crop back, the
  CIFAR recipe) or ``"none"`` (resize shorter side + centre crop). ``flip`` adds a host-side
  horizontal flip: True = random (usually done on device instead), ``"alternate"`` = airbench's
  alternating flip (a fixed random half of the images mirrored in even epochs, the other half in
  odd ones, so every image is seen both ways in any two consecutive epochs).
  ``num_epochs=None`` repeats forever. ``num_threads`` decode in parallel in this process (PIL releases the GIL);
  ``num_workers`` > 0 adds grain worker processes; neither changes the batches.
  ``process_index/count`` default to ``jax.process_index()/process_count()``.
  """
  _check_common(source, batch_size, image_size)
  if crop not in CROPS:
    raise ValueError(f"crop must be one of {CROPS}; got {crop!r}")
  if flip not in (True, False, "alternate"):
    raise ValueError(f"flip must be True, False or 'alternate'; got {flip!r}")
  if not (0 < scale[0] <= scale[1] <= 1):
    raise ValueError(f"scale must satisfy 0 < low <= high <= 1; got {scale}")
  if not (0 < ratio[0] <= ratio[1]):
    raise ValueError(f"ratio must satisfy 0 < low <= high; got {ratio}")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative int; got {seed!r}")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs must be >= 1 or None (forever); got {num_epochs}")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0; got {num_workers}")
  p, pc = _process_info(process_index, process_count)
  steps = len(source) // (batch_size * pc)
  if steps == 0:
    raise ValueError(
      f"{len(source)} examples are fewer than one global batch ({batch_size} x {pc} processes)")
  make = TrainBatch(
    source, batch_size=batch_size, image_size=image_size, seed=int(seed), crop=crop, flip=flip,
    scale=tuple(scale), ratio=tuple(ratio), padding=padding, process_index=p, process_count=pc,
    steps_per_epoch=steps, strict=strict)
  threads = _default_threads(source) if num_threads is None else num_threads
  total = steps * (num_epochs or _INFINITE_EPOCHS)
  return Loader(make, total, num_threads=threads, num_workers=num_workers,
                prefetch=prefetch or max(2, 2 * threads), source=source, batch_size=batch_size,
                image_size=image_size, steps_per_epoch=steps, infinite=num_epochs is None)


def eval_loader(
  source,
  *,
  batch_size: int,
  image_size: int,
  crop_fraction: float = 0.875,
  num_workers: int = 0,
  num_threads: int | None = None,
  prefetch: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  strict: bool = False,
) -> Loader:
  """One pass of evaluation batches ``{"image", "label", "mask": bool [B]}``.

  Every example is seen exactly once over all processes: process ``p`` of ``P`` reads
  examples ``p, p + P, ...``; all processes yield ``ceil(ceil(N / P) / batch_size)``
  batches, the last padded with zero images, label 0 and ``mask=False``. Images are resized
  (shorter side ``image_size / crop_fraction``) and centre-cropped to ``image_size``;
  images already ``image_size`` square pass unchanged. A corrupt file becomes a masked-out
  slot (counted in ``iterator.num_skipped``) unless ``strict=True``.
  """
  _check_common(source, batch_size, image_size)
  if not 0 < crop_fraction <= 1:
    raise ValueError(f"crop_fraction must be in (0, 1]; got {crop_fraction}")
  p, pc = _process_info(process_index, process_count)
  per_process = math.ceil(len(source) / pc)
  num_batches = math.ceil(per_process / batch_size)
  make = EvalBatch(source, batch_size=batch_size, image_size=image_size, crop_fraction=crop_fraction,
                   process_index=p, process_count=pc, strict=strict)
  threads = _default_threads(source) if num_threads is None else num_threads
  return Loader(make, num_batches, num_threads=threads, num_workers=num_workers,
                prefetch=prefetch or max(2, 2 * threads), source=source, batch_size=batch_size,
                image_size=image_size)
