"""What an optimizer costs per training step: the CIFAR-10 presets' SGD + lookahead vs Muon.

Times ``experiments/cifar10.py``'s presets (``cpu_sgd``: airbench94's Nesterov SGD + lookahead;
``cpu``: airbench94_muon's Muon on the conv kernels) as ``jcv.train.fit`` runs them: the
data-parallel jitted step over ``--devices-per-core`` XLA CPU devices per core (default 1, as
``experiments/cifar10.py`` trains), both on the ``cpu`` preset's net (width 0.75), so only the
optimizer differs; random uint8 batches fed from host
numpy every step, in interleaved rounds of ``--steps-per-call`` steps ending with a block. Also
times Muon's Newton-Schulz iterations alone for the preset's kernel shapes.

  python benchmarks/optimizers.py [--batch-size 128] [--rounds 5] [--out benchmarks/results/optimizers]
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))

__all__ = ["main"]


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch-size", type=int, default=128, help="global batch (default: the presets')")
  p.add_argument("--host-devices", default="cores", help="XLA CPU devices: 'cores' or a number")
  p.add_argument("--devices-per-core", type=int, default=1, help="with --host-devices cores")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps-per-call", type=int, default=10)
  p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "optimizers"))
  return p.parse_args(argv)


def _time_presets(args, batch: dict) -> list[dict]:
  """One row per preset: ms per step and img/s of its compiled data-parallel train step."""
  import cifar10
  import jax
  from benchmarks.common import interleaved_times, median, step_runner
  from jcv.train import build, optim, parallel
  from jcv.train.state import create_train_state

  mesh = parallel.make_mesh()

  def runner(config):
    config = config.replace(data={"batch_size": args.batch_size}, model={"options": cifar10.CPU.model.options})
    model = build.build_model(config, 10)
    tx, schedule = optim.make_optimizer(config, steps_per_epoch=390, total_steps=build.total_steps(config, 390))
    state = parallel.replicate(create_train_state(jax.random.key(0), model, tx, (1, 32, 32, 3)), mesh)
    step = parallel.compile_train_step(
        build.train_fn(config, num_classes=10, augment_fn=build.build_augment(config, 10), schedule=schedule),
        mesh, mode="jit")
    return step_runner(step, state, batch, mesh, args.steps_per_call)

  presets = {"sgd_lookahead (cpu_sgd)": cifar10.CPU_SGD, "muon (cpu)": cifar10.CPU}
  fns = {name: runner(cfg) for name, cfg in presets.items()}
  times = interleaved_times(fns, rounds=args.rounds, iters_per_round=1, warmup=1)
  rows = []
  for name, ts in times.items():
    per_step = median(ts) / args.steps_per_call
    rows.append({"optimizer": name, "ms_per_step": 1e3 * per_step, "img_per_s": args.batch_size / per_step})
  return rows


def _time_newton_schulz(args, rng) -> tuple[list, list]:
  """Newton-Schulz alone, one update's worth for the Muon preset's conv kernels (cout x 9 cin):
  (the kernel matrices, the timings)."""
  import cifar10
  import flax
  import jax
  import jax.numpy as jnp
  import numpy as np
  from benchmarks.common import interleaved_times
  from jcv.train import build, optax_extras

  model = build.build_model(cifar10.CPU, 10)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  shapes = [leaf.shape for path, leaf in flax.traverse_util.flatten_dict(params, sep="/").items()
            if leaf.ndim == 4 and not path.startswith("whiten")]
  mats = [jnp.asarray(rng.normal(size=(s[-1], int(np.prod(s[:-1])))), jnp.float32) for s in shapes]
  ns = jax.jit(lambda ms: [optax_extras.newton_schulz(m, cifar10.CPU.optim.muon.ns_steps) for m in ms])
  ns_times = interleaved_times({"ns": lambda: jax.block_until_ready(ns(mats))}, rounds=args.rounds,
                               iters_per_round=5, warmup=2)["ns"]
  return mats, ns_times


def _report(args, rows: list[dict], mats: list, ns_times: list) -> None:
  """Adds each row's speed relative to SGD, prints the table and writes the JSON."""
  import cifar10
  import jax
  from benchmarks.common import machine_info, median, write_json

  base = rows[0]["img_per_s"]
  print(f"cifar_cnn {cifar10.CPU.model.options}, batch {args.batch_size}, {jax.device_count()} XLA CPU device(s)")
  for r in rows:
    r["vs_sgd"] = r["img_per_s"] / base
    print(f"  {r['optimizer']:>24s}: {r['ms_per_step']:7.1f} ms/step  {r['img_per_s']:6.0f} img/s  "
          f"{r['vs_sgd']:.3f}x")
  ns_ms = 1e3 * median(ns_times)
  print(f"  Newton-Schulz ({cifar10.CPU.optim.muon.ns_steps} steps) for {len(mats)} kernels "
        f"{[tuple(m.shape) for m in mats]}: {ns_ms:.1f} ms on one device")
  write_json(args.out + ".json", {"machine": machine_info(), "batch_size": args.batch_size,
                                  "devices": jax.device_count(), "rows": rows,
                                  "newton_schulz_ms": ns_ms, "kernel_matrices": [list(m.shape) for m in mats]})


def main(argv=None):
  """Parses the flags, sets up the XLA CPU devices, times both presets and Newton-Schulz, reports."""
  args = _parse_args(argv)
  from jcv import perf
  perf.setup_cpu(host_devices=args.host_devices if args.host_devices == "cores" else int(args.host_devices),
                 devices_per_core=args.devices_per_core)
  import numpy as np

  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (args.batch_size, 32, 32, 3), dtype=np.uint8),
           "label": rng.integers(0, 10, args.batch_size).astype(np.int32)}
  rows = _time_presets(args, batch)
  mats, ns_times = _time_newton_schulz(args, rng)
  _report(args, rows, mats, ns_times)
  return rows


if __name__ == "__main__":
  main()
