"""Host-side meters of the training loop: running means of the step metrics, images per second."""
from __future__ import annotations

import time

__all__ = ["RunningMeans", "Throughput"]


class RunningMeans:
  """Averages of the training metrics since the last log, and the last step's values."""

  def __init__(self):
    self.last = {}
    self.reset()

  def reset(self):
    self.sums, self.count = {}, 0

  def add(self, m):
    for k, v in m.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1
    self.last = {k: float(v) for k, v in m.items()}

  def mean(self):
    out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    out.update(lr=self.last.get("lr", 0.0))
    return out


class Throughput:
  """Images per second, excluding the first (compiling) window and evaluations."""

  def __init__(self, batch_size):
    self.batch_size = batch_size
    self.t0, self.steps0 = None, 0
    self.total_time, self.total_steps = 0.0, 0
    self._rate = 0.0

  def mark(self, step):
    now = time.perf_counter()
    if self.t0 is not None and step > self.steps0:
      dt, ds = now - self.t0, step - self.steps0
      self._rate = ds * self.batch_size / dt
      self.total_time += dt
      self.total_steps += ds
    self.t0, self.steps0 = now, step

  def restart(self):
    self.t0 = None

  def rate(self):
    return self._rate

  def overall(self):
    return self.total_steps * self.batch_size / self.total_time if self.total_time else None
