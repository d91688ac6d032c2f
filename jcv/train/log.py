"""Run logs in the work directory: TensorBoard events (tensorboardX), metrics.jsonl, JSON files.

Only process 0 writes (``enabled=False`` elsewhere), so multi-host runs log once.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time
import warnings

import numpy as np

from jcv import safefile

__all__ = ["MetricLogger", "Progress", "write_json", "read_jsonl", "image_grid", "format_duration"]


def write_json(path, obj):
  """Writes ``obj`` as indented JSON atomically (temp file + rename; links refused)."""
  safefile.write_json(path, obj, indent=2, default=_jsonable)


def read_jsonl(path) -> list[dict]:
  """All records of a JSONL file. A torn line (from a killed run) is skipped; lines that are
  not UTF-8 are skipped with one warning naming the file."""
  out, not_text = [], 0
  for raw in pathlib.Path(path).read_bytes().splitlines():
    try:
      record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
      not_text += 1
      continue
    except json.JSONDecodeError:
      continue
    if isinstance(record, dict):
      out.append(record)
  if not_text:
    warnings.warn(f"{path}: skipped {not_text} line(s) that are not UTF-8 text")
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
  """Scalars to TensorBoard and ``metrics.jsonl`` (one record per call, with step and split).

  ``keep_until``: the step a resumed run starts from; the records of later steps (logged
  before the run stopped, and about to be logged again) and torn lines are dropped first."""

  def __init__(self, workdir, *, enabled: bool = True, keep_until: int | None = None):
    self.workdir = pathlib.Path(workdir)
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      SummaryWriter = _summary_writer_class()
      self.workdir.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(self.workdir / "tensorboard"))
      path = self.workdir / "metrics.jsonl"
      if keep_until is not None and path.exists():
        kept = [r for r in read_jsonl(path) if r.get("step", 0) <= keep_until]
        safefile.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
      self._jsonl = safefile.open_append(path)

  def scalars(self, step: int, metrics: dict, *, split: str = "train"):
    """Logs ``{name: number}`` at ``step`` under ``split/name``."""
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    # metrics.jsonl first: it is flushed here, so a full disk shows in the caller's thread
    self._jsonl.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(f"{split}/{k}", v, step)

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


def format_duration(seconds: float) -> str:
  """``75`` -> ``"1m15s"``, ``3700`` -> ``"1h01m"``."""
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
  """Training progress a user can follow anywhere.

  On a terminal (``stream.isatty()``) with ``bar=True``: a tqdm bar. Otherwise (a log file,
  nohup, CI, a job scheduler) one line per epoch end, and at most every ``every_s`` seconds
  in between, ``train step 390/1950 (epoch 1/5)  loss 1.234  acc 0.567  640 img/s  ETA 4m10s``,
  and one line per evaluation. ``enabled=False`` (processes other than 0) prints nothing.
  """

  def __init__(self, *, total: int, start: int = 0, steps_per_epoch: int = 0, enabled: bool = True,
               bar: bool = True, stream=None, every_s: float = 60.0):
    self.total, self.steps_per_epoch, self.enabled = total, steps_per_epoch, enabled
    self.stream = stream if stream is not None else sys.stderr
    self.every_s = every_s
    self.n = start
    self._start, self._t0, self._last_line = start, time.monotonic(), None
    self._bar = None
    if enabled and bar and getattr(self.stream, "isatty", lambda: False)():
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, desc="train",
                       file=self.stream)

  def _print(self, text: str):
    print(text, file=self.stream, flush=True)

  def _epoch_text(self, step: int) -> str:
    if not self.steps_per_epoch:
      return ""
    epochs = -(-self.total // self.steps_per_epoch)
    return f" (epoch {step / self.steps_per_epoch:.3g}/{epochs})"

  def show(self, step: int, metrics: dict, img_per_s: float):
    """After the steps up to ``step`` finished with ``metrics`` (loss, top1, ...)."""
    if not self.enabled:
      return
    done, self.n = step - self.n, step
    loss, acc = metrics.get("loss", float("nan")), metrics.get("top1", float("nan"))
    if self._bar is not None:
      self._bar.update(done)
      self._bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", img_s=f"{img_per_s:.0f}")
      return
    now = time.monotonic()
    epoch_end = bool(self.steps_per_epoch) and step % self.steps_per_epoch == 0
    if not (epoch_end or step == self.total or self._last_line is None
            or now - self._last_line >= self.every_s):
      return
    self._last_line = now
    rate = (step - self._start) / max(now - self._t0, 1e-9)
    eta = format_duration((self.total - step) / rate) if rate > 0 and step < self.total else "0s"
    speed = f"{img_per_s:.0f} img/s" if img_per_s else "warming up"
    self._print(f"train step {step}/{self.total}{self._epoch_text(step)}  loss {loss:.4f}  acc {acc:.4f}  "
                f"{speed}  ETA {eta}")

  def eval(self, step: int, metrics: dict):
    """One line with an evaluation's results (also under the bar on a terminal)."""
    if not self.enabled:
      return
    text = (f"eval  step {step}/{self.total}{self._epoch_text(step)}  loss {metrics.get('loss', float('nan')):.4f}  "
            f"top1 {metrics.get('top1', float('nan')):.4f}  top5 {metrics.get('top5', float('nan')):.4f}  "
            f"n {metrics.get('n', 0)}")
    if self._bar is not None:
      self._bar.write(text, file=self.stream)
    else:
      self._print(text)

  def close(self):
    if self._bar is not None:
      self._bar.close()
