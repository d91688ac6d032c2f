"""Data parallelism over every device of every process.

Two modes, same results (to float rounding) as one device for the same global batch:

* ``"jit"`` (default): one ``Mesh`` with a ``data`` axis over ``jax.devices()``; batches
  sharded along it with ``jax.make_array_from_process_local_data``, state replicated, the
  step ``jax.jit``-compiled with those shardings and the state donated. XLA (GSPMD) inserts
  the collectives, so BatchNorm sees global-batch statistics.
* ``"pmap"``: per-device SPMD with explicit collectives. ``jax.pmap`` is in maintenance mode
  in the installed JAX and is itself implemented with ``jit`` + ``shard_map``, so we use
  ``jax.shard_map`` directly (it composes with ``jit``, donation and multi-host meshes).
  ``check_vma=False`` gives pmap's semantics: a replicated parameter's gradient is the
  per-device gradient, and train_step averages grads, BN statistics and metrics with
  ``lax.pmean``. (With ``check_vma=True``, autodiff would already psum the gradient of a
  replicated parameter over devices; a pmean on top would then be n times too large.)
  BatchNorm normalises over the global batch here too (``train_step(sync_batch_stats=True)``,
  the default; False gives pmap's per-device statistics), and augmentation and dropout draw
  per example, so 1, 2 or 8 devices give the same parameters (jcv.train.invariance).

Multi-host: ``initialize_distributed`` calls ``jax.distributed.initialize``; every process
feeds its own shard of the global batch.
"""
from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jcv import perf

__all__ = [
    "DATA_AXIS", "initialize_distributed", "make_mesh", "replicate", "shard_batch", "batch_spec",
    "compile_train_step", "compile_eval_step", "fetch", "train_devices",
]

DATA_AXIS = "data"


def _env_int(name: str) -> int | None:
  text = os.environ.get(name)
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"${name} must be a whole number, got {text!r}") from None


def initialize_distributed(*, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Starts multi-process JAX when asked (arguments, else $JCV_COORDINATOR_ADDRESS,
  $JCV_NUM_PROCESSES, $JCV_PROCESS_ID). Returns True if it initialised.

  Must run before any other JAX call. CPU collectives use gloo.
  """
  coordinator_address = coordinator_address or os.environ.get("JCV_COORDINATOR_ADDRESS")
  if num_processes is None:
    num_processes = _env_int("JCV_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JCV_PROCESS_ID")
  if not coordinator_address:
    if num_processes not in (None, 1):
      raise ValueError("num_processes > 1 needs a coordinator_address (host:port of process 0)")
    return False
  if num_processes is None or process_id is None:
    raise ValueError("multi-host needs coordinator_address, num_processes and process_id together")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  return True


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
  """Places a host/device pytree fully replicated over the mesh (same value on every process)."""
  sharding = NamedSharding(mesh, P())
  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_process_local_data(sharding, x, x.shape)
  return jax.tree.map(put, tree)


def shard_batch(batch, mesh: Mesh):
  """This process's batch (numpy, leading axis = per-process batch) -> global arrays sharded on ``data``."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  local = len(mesh.local_devices)
  def put(x):
    x = np.asarray(x)
    if x.shape[0] % local:
      raise ValueError(f"per-process batch {x.shape[0]} is not divisible by the {local} local devices")
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, batch)


def batch_spec(mesh: Mesh, global_batch: int, image_shape, *, mask: bool = False, dtype=np.uint8) -> dict:
  """ShapeDtypeStructs of a global batch (uint8 images, or ``dtype`` inputs such as cached
  features) sharded on ``data`` (for ahead-of-time lowering)."""
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  spec = {"image": jax.ShapeDtypeStruct((global_batch, *image_shape), dtype, sharding=sharding),
          "label": jax.ShapeDtypeStruct((global_batch,), np.int32, sharding=sharding)}
  if mask:
    spec["mask"] = jax.ShapeDtypeStruct((global_batch,), np.bool_, sharding=sharding)
  return spec


def compile_train_step(train_fn, mesh: Mesh, *, mode: str = "jit"):
  """jit-compiles ``train_fn(state, batch, *, axis_name=None) -> (state, metrics)`` for the mesh.

  The state argument is donated; state and metrics come back replicated.
  """
  replicated = NamedSharding(mesh, P())
  if mode == "jit":
    return jax.jit(train_fn, in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS))),
                   out_shardings=(replicated, replicated), donate_argnums=0)
  if mode == "pmap":
    per_device = jax.shard_map(functools.partial(train_fn, axis_name=DATA_AXIS), mesh=mesh,
                               in_specs=(P(), P(DATA_AXIS)), out_specs=(P(), P()), check_vma=False)
    return jax.jit(per_device, donate_argnums=0)
  raise ValueError(f"parallel mode must be 'jit' or 'pmap', got {mode!r}")


def compile_eval_step(eval_fn, mesh: Mesh, *, mode: str = "jit"):
  """jit-compiles ``eval_fn(state, batch, *, axis_name=None) -> metric sums`` (replicated)."""
  replicated = NamedSharding(mesh, P())
  if mode == "jit":
    return jax.jit(eval_fn, in_shardings=(replicated, NamedSharding(mesh, P(DATA_AXIS))),
                   out_shardings=replicated)
  if mode == "pmap":
    per_device = jax.shard_map(functools.partial(eval_fn, axis_name=DATA_AXIS), mesh=mesh,
                               in_specs=(P(), P(DATA_AXIS)), out_specs=P(), check_vma=False)
    return jax.jit(per_device)
  raise ValueError(f"parallel mode must be 'jit' or 'pmap', got {mode!r}")


def fetch(tree):
  """Host numpy copy of replicated (or fully addressable) arrays; blocks until computed."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree.map(get, tree)


def _timed_step(fn, state, batch):
  started = time.perf_counter()
  state, metrics = fn(state, batch)
  jax.block_until_ready(metrics)
  return state, time.perf_counter() - started


def train_devices(choice, train_fn, state, batch, *, mode: str = "jit", steps: int = 4) -> list:
  """The devices to train on for ``run.devices`` = ``choice``: "all", a count N (the first N
  of this process), or "auto".

  "auto", on a single-process CPU backend with several devices: ``train_fn`` (as for
  :func:`compile_train_step`) is compiled for all devices and for one (which then has every
  core to itself), each runs from the host ``state`` on the host ``batch``: warm-up steps until
  one is no longer 1.15x faster than the last (2 to 8), then ``steps`` timed ones, and the faster
  best step wins (all unless one is 5 % faster). One device wins where
  the step is small next to its weights: ResNet-18 on 32 px CIFAR images at batch 32, where
  each of 2 devices unrolls the same 3x3 kernels for the 2x2 and 1x1 maps and all-reduces
  45 MB of gradients (Xeon, 2 cores: 56 ms a step against 84). Elsewhere "auto" is "all".
  """
  devices = jax.devices()
  if choice == "all" or (choice == "auto" and (jax.default_backend() != "cpu" or jax.process_count() > 1
                                               or len(devices) == 1)):
    return devices
  if choice != "auto":
    if jax.process_count() > 1 or not 1 <= int(choice) <= len(devices):
      raise ValueError(f"run.devices={choice} needs 1 to {len(devices)} devices in one process")
    return devices[:int(choice)]
  seconds = {}
  for candidate in (devices, devices[:1]):
    mesh = make_mesh(candidate)
    fn, placed, sharded = compile_train_step(train_fn, mesh, mode=mode), replicate(state, mesh), shard_batch(batch, mesh)
    times = []  # warm-up: the first steps fault in the heap
    while len(times) < 2 or (len(times) < 8 and times[-2] > 1.15 * times[-1]):
      placed, took = _timed_step(fn, placed, sharded)
      times.append(took)
    best = float("inf")
    for _ in range(steps):
      placed, took = _timed_step(fn, placed, sharded)
      best = min(best, took)
    seconds[len(candidate)] = best
  del fn, placed, sharded
  perf.trim_heap()  # the candidates' buffers: the run itself needs one mesh's
  chosen = devices[:1] if seconds[1] < 0.95 * seconds[len(devices)] else devices
  print(f"run.devices=auto: a step takes {1e3 * seconds[len(devices)]:.0f} ms on {len(devices)} devices, "
        f"{1e3 * seconds[1]:.0f} ms on one: training on {len(chosen)}")
  return chosen
