"""Launching run_tiny.py as real subprocesses for the resume and multi-host tests."""
import os
import pathlib
import subprocess
import sys
import time

import numpy as np

RUN_TINY = pathlib.Path(__file__).resolve().parent / "run_tiny.py"
LAUNCHED: list = []  # every process started here, so a failing test can stop its leftovers


def kill_leftovers():
  """SIGKILLs processes started by ``launch`` that are still running (only those)."""
  while LAUNCHED:
    proc = LAUNCHED.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def launch(workdir, *args, devices=8, env=None):
  """Starts ``run_tiny.py --workdir workdir *args`` with its own XLA_FLAGS; output to a log file."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  full_env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
              "JAX_PLATFORMS": "cpu", **(env or {})}
  log = open(workdir.parent / f"{workdir.name}.{time.monotonic_ns()}.log", "w")
  proc = subprocess.Popen([sys.executable, str(RUN_TINY), "--workdir", str(workdir), *map(str, args)],
                          env=full_env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_path = log.name
  LAUNCHED.append(proc)
  return proc


def run_to_end(workdir, *args, **kwargs):
  """``launch(workdir, *args)`` waited for; asserts it ended with status 0 -> ``workdir``."""
  proc = launch(workdir, *args, **kwargs)
  assert finish(proc) == 0, output(proc)[-3000:]
  return pathlib.Path(workdir)


def output(proc) -> str:
  return pathlib.Path(proc.log_path).read_text()


def committed_steps(workdir) -> list[int]:
  """Completed Orbax step folders (temporary ones are not digits-only)."""
  d = pathlib.Path(workdir) / "checkpoints"
  if not d.is_dir():
    return []
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def wait_for_step(proc, workdir, min_step, *, timeout=600):
  """Blocks until a checkpoint >= min_step is committed; fails if the process ends first."""
  end = time.monotonic() + timeout
  while time.monotonic() < end:
    steps = committed_steps(workdir)
    if steps and steps[-1] >= min_step:
      return steps[-1]
    if proc.poll() is not None:
      raise AssertionError(f"run ended (rc={proc.returncode}) before step {min_step}:\n{output(proc)[-3000:]}")
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint >= {min_step} after {timeout}s:\n{output(proc)[-3000:]}")


def finish(proc, *, timeout=600) -> int:
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise AssertionError(f"run did not finish in {timeout}s:\n{output(proc)[-3000:]}")


def load_params(workdir, process=0) -> dict:
  with np.load(pathlib.Path(workdir) / f"params_p{process}.npz") as z:
    return {k: z[k] for k in z.files}
