"""Shared helpers for the jcv benchmarks: timing, interleaving, machine description, output.

Timing rule used everywhere: warm up (compile) first, then time single iterations that end in
``block_until_ready`` (JAX) or return synchronised results (PyTorch eager on CPU), and report
the median. Competing implementations are timed in interleaved rounds (A, B, A, B, ...) so that
load from other processes on a shared machine hits all of them alike.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, NamedTuple

__all__ = ["Timing", "interleaved_times", "machine_info", "median", "write_csv", "write_json"]


class Timing(NamedTuple):
  """Returned by a callable that times itself (one running in a worker process)."""
  wall_s: float
  cpu_s: float


def median(values) -> float:
  """Median of a non-empty sequence (nan if empty)."""
  values = list(values)
  return statistics.median(values) if values else float("nan")


def step_runner(step, state, batch, mesh, steps: int) -> Callable[[], None]:
  """A closure that runs ``steps`` compiled jcv train steps on one fixed host ``batch``
  (sharded over ``mesh`` each step, as ``fit`` feeds it), then waits for the last metrics."""
  import jax
  from jcv.train import parallel
  box = [state]

  def run():
    for _ in range(steps):
      box[0], metrics = step(box[0], parallel.shard_batch(batch, mesh))
    jax.block_until_ready(metrics)
  return run


STEADY = 1.15       # a warm-up call this much slower than the next one: not warm yet
MAX_EXTRA_WARMUP = 6


def _warm_up(fn: Callable[[], object], warmup: int) -> None:
  """Calls ``fn`` ``warmup`` times, then again while the last call was more than :data:`STEADY`
  times slower than the one after it (at most :data:`MAX_EXTRA_WARMUP` more). A jitted step's
  first calls grow the heap and fault its pages in (a 2-device MobileNetV2 step at 160 px on a
  2-core Xeon: 755, 560, then 419 ms; the second call also 2 s after a peer's process had run),
  which a fixed warm-up of one call leaves among the timed iterations."""
  def wall():
    start = time.perf_counter()
    out = fn()
    return out.wall_s if isinstance(out, Timing) else time.perf_counter() - start
  last = None
  for _ in range(warmup):
    last = wall()
  for _ in range(MAX_EXTRA_WARMUP if warmup else 0):
    now = wall()
    if last <= STEADY * now:
      return
    last = now


def interleaved_times(fns: dict[str, Callable[[], object]], *, rounds: int = 5,
                      iters_per_round: int = 2, warmup: int = 2,
                      budget_s: float | None = None,
                      cpu_times: dict | None = None, settle_s: float = 0.0) -> dict[str, list[float]]:
  """Times each callable in interleaved rounds; returns per-iteration wall seconds per name.

  Each callable is warmed up ``warmup`` times first, and further until it stops getting faster
  (:func:`_warm_up`). With ``budget_s``, stops after the first
  round in which the total elapsed time passed the budget (at least one round always runs).
  If ``cpu_times`` is a dict, it receives the per-iteration CPU seconds of this process (all
  threads) per name: on a machine shared with other jobs that is the steadier measure of the
  work done, while wall time also counts waiting for a core. A callable that returns a
  :class:`Timing` reports its own wall and CPU seconds instead (a worker process's).
  ``settle_s``: seconds of sleep before each callable's round, so that the threads of the one
  timed before (OpenMP and XLA pools spin a while after their work ends) are idle again.
  """
  for fn in fns.values():
    _warm_up(fn, warmup)
  times = {name: [] for name in fns}
  if cpu_times is not None:
    cpu_times.update({name: [] for name in fns})
  start = time.perf_counter()
  for r in range(rounds):
    for name, fn in fns.items():
      time.sleep(settle_s)
      for _ in range(iters_per_round):
        cpu, start_one = time.process_time(), time.perf_counter()
        out = fn()
        wall, used = time.perf_counter() - start_one, time.process_time() - cpu
        if isinstance(out, Timing):
          wall, used = out
        times[name].append(wall)
        if cpu_times is not None:
          cpu_times[name].append(used)
    if budget_s is not None and time.perf_counter() - start > budget_s:
      break
  return times


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info() -> dict:
  """Machine, load and library versions, to store next to every number."""
  import jax
  info = {
      "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
      "cpu": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    import torch
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
  except ImportError:
    info["torch"] = None
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=10)
    if out.returncode == 0:
      info["gpus"] = out.stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError):
    pass
  return info


def write_json(path, obj) -> None:
  """Writes ``obj`` as indented JSON, creating parent folders."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, default=str)


def write_csv(path, rows: list[dict]) -> None:
  """Writes dict rows as CSV (the union of keys, in first-seen order)."""
  import csv
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  keys: list[str] = []
  for row in rows:
    keys += [k for k in row if k not in keys]
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
