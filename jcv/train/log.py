"""Run logs in the work directory: TensorBoard events (tensorboardX), metrics.jsonl, JSON files.

Only process 0 writes (``enabled=False`` elsewhere), so multi-host runs log once.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import numpy as np

__all__ = ["MetricLogger", "write_json", "read_jsonl", "image_grid"]


def write_json(path, obj):
  """Writes ``obj`` as indented JSON atomically (temp file + rename)."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
  tmp.replace(path)


def read_jsonl(path) -> list[dict]:
  """All records of a JSONL file (a truncated last line, from a killed run, is skipped)."""
  out = []
  for line in pathlib.Path(path).read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


def _jsonable(x):
  if isinstance(x, (np.generic, np.ndarray)):
    return x.tolist()
  return str(x)


def image_grid(images, *, columns: int = 8) -> np.ndarray:
  """uint8/float [N, H, W, C] -> one HWC uint8 image with the N images tiled in rows."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    lo, hi = float(images.min()), float(images.max())
    images = ((images - lo) / max(hi - lo, 1e-8) * 255).round().astype(np.uint8)
  n, h, w, c = images.shape
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, c), np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = img
  return grid


def _summary_writer_class():
  """tensorboardX.SummaryWriter, imported without pulling in PyTorch.

  tensorboardX's writer module does ``try: import torch`` at import time, which costs
  seconds when PyTorch is installed (here: for the benchmarks). jcv only logs numpy and
  floats, so unless torch is already loaded, that import is made to fail just for this.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricLogger:
  """Scalars to TensorBoard and ``metrics.jsonl`` (one record per call, with step and split)."""

  def __init__(self, workdir, *, enabled: bool = True):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      SummaryWriter = _summary_writer_class()
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
      self._jsonl = open(self.workdir / "metrics.jsonl", "a")

  def scalars(self, step: int, metrics: dict, *, split: str = "train"):
    """Logs ``{name: number}`` at ``step`` under ``split/name``."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    for k, v in clean.items():
      self._tb.add_scalar(f"{split}/{k}", v, step)
    self._jsonl.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **clean}) + "\n")
    self._jsonl.flush()

  def images(self, step: int, name: str, images):
    """A grid of NHWC images (e.g. one augmented training batch)."""
    if self.enabled:
      self._tb.add_image(name, image_grid(images), step, dataformats="HWC")

  def hparams(self, config: dict, metrics: dict):
    """The run's hyperparameters next to its final metrics (TensorBoard HPARAMS tab)."""
    if not self.enabled:
      return
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in config.items()}
    flat = {k: v for k, v in flat.items() if v is not None}
    self._tb.add_hparams(flat, {f"hparam/{k}": float(v) for k, v in metrics.items()}, name="hparams")

  def text(self, name: str, text: str):
    """A text note in TensorBoard."""
    if self.enabled:
      self._tb.add_text(name, text)

  def flush(self):
    """Pushes buffered events and records to disk."""
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self):
    """Flushes and closes the writers."""
    if self.enabled:
      self._tb.close()
      self._jsonl.close()
