"""Training-step wrappers: jcv's data-parallel steps vs a bare jitted step, img/s.

Per optimizer step of a model at global batch B on uint8 NHWC arrays, timed in interleaved
rounds of ``--steps-per-call`` steps that end with a block (as jcv.train.loop does):

- ``bare``: ``jax.jit(train_step)`` with the batch already on the device (the floor of
  Python + dispatch overhead: what a hand-written Flax loop does at best),
- ``jcv_jit``: ``parallel.compile_train_step(mode="jit")`` (Mesh + NamedSharding, donated
  state) fed from host numpy through ``parallel.shard_batch`` every step, as in ``fit``,
- ``jcv_pmap``: the same with ``mode="pmap"`` (shard_map, explicit pmean).

  python benchmarks/train_loop.py                      # 1 device
  python benchmarks/train_loop.py --devices 8          # 8 fake CPU devices (XLA_FLAGS)

Writes benchmarks/results/train_loop[_<devices>dev].json.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="resnet20")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--devices", type=int, default=1, help="fake CPU devices (sets XLA_FLAGS)")
  p.add_argument("--steps-per-call", type=int, default=4)
  p.add_argument("--rounds", type=int, default=4)
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def _step_runners(args) -> dict:
  """Name -> a closure running ``--steps-per-call`` train steps: ``bare``, ``jcv_jit``, ``jcv_pmap``."""
  import functools

  import jax
  import numpy as np

  from benchmarks.common import step_runner
  from jcv.train import Config, Data, Model, build, optim, parallel
  from jcv.train.state import create_train_state
  from jcv.train.step import train_step

  cfg = Config(model=Model(name=args.model), data=Data(image_size=args.image_size, batch_size=args.batch_size))
  model = build.build_model(cfg, 10)
  tx, sched = optim.make_optimizer(cfg, steps_per_epoch=100, total_steps=1000)
  fn = functools.partial(train_step, num_classes=10, mean=cfg.data.mean, std=cfg.data.std, schedule=sched)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch_size, args.image_size, args.image_size, 3), np.uint8)
  batch = {"image": images, "label": rng.integers(0, 10, args.batch_size).astype(np.int32)}
  shape = (1, args.image_size, args.image_size, 3)

  def make_bare():
    state = create_train_state(jax.random.key(0), model, tx, shape)
    step = jax.jit(fn, donate_argnums=0)
    on_device = jax.device_put(batch)
    box = [state]
    def run():
      for _ in range(args.steps_per_call):
        box[0], metrics = step(box[0], on_device)
      jax.block_until_ready(metrics)
    return run

  def make_jcv(mode):
    mesh = parallel.make_mesh()
    state = parallel.replicate(create_train_state(jax.random.key(0), model, tx, shape), mesh)
    step = parallel.compile_train_step(fn, mesh, mode=mode)
    return step_runner(step, state, batch, mesh, args.steps_per_call)

  return {"bare": make_bare(), "jcv_jit": make_jcv("jit"), "jcv_pmap": make_jcv("pmap")}


def _measure(args, fns: dict) -> dict:
  """Name -> img/s, ms and CPU s per step, samples and ratio to ``bare``, over interleaved rounds."""
  from benchmarks.common import interleaved_times, median

  cpu = {}
  times = interleaved_times(fns, rounds=args.rounds, iters_per_round=1, warmup=1, cpu_times=cpu)
  images_per_call = args.batch_size * args.steps_per_call
  rows = {name: {"img_per_s": images_per_call / median(t), "ms_per_step": 1e3 * median(t) / args.steps_per_call,
                 "cpu_s_per_step": median(cpu[name]) / args.steps_per_call, "samples": len(t)}
          for name, t in times.items()}
  for name in rows:
    rows[name]["ratio_to_bare"] = rows[name]["img_per_s"] / rows["bare"]["img_per_s"]
  return rows


def _report(args, rows: dict) -> None:
  """Writes the JSON result and prints one line per wrapper."""
  import jax

  from benchmarks.common import machine_info, write_json

  result = {"machine": machine_info(), "args": vars(args), "devices": jax.device_count(), "results": rows}
  out = args.out or str(pathlib.Path(__file__).parent / "results" /
                        ("train_loop.json" if args.devices == 1 else f"train_loop_{args.devices}dev.json"))
  write_json(out, result)
  print(f"{args.model} batch {args.batch_size} {args.image_size}px, {jax.device_count()} device(s), "
        f"load {result['machine']['load_avg_1_5_15']}")
  for name, r in rows.items():
    print(f"  {name:9s} {r['img_per_s']:8.1f} img/s  {r['ms_per_step']:8.1f} ms/step  x{r['ratio_to_bare']:.2f} of bare")


def main(argv=None):
  """Parses the flags, sets the fake devices, then builds, times and reports the three wrappers."""
  args = _parse_args(argv)
  if args.devices > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  _report(args, _measure(args, _step_runners(args)))


if __name__ == "__main__":
  main()
