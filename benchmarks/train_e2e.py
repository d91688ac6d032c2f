"""End-to-end training throughput with the real input pipeline, and which side is the bottleneck.

Measures, on real JPEGs from an image folder (default ``../shared/data/cifar10``):

1. **input**: the grain train loader alone (decode, crop, batch), batches per second;
2. **step**: the jitted ``jcv.train.step.train_step`` alone on one fixed batch, with the
   on-device augmentation fused into it (``jcv.data.augment.make_augment``) and the state
   donated;
3. **end to end**: loader -> device -> step, dispatching asynchronously (the next batch is
   prepared while the previous step runs),

and reports img/s of each, the bottleneck (the slower of 1 and 2) and how much of it the end-to-end
loop achieves. Usage::

  python benchmarks/train_e2e.py [--data-dir ../shared/data/cifar10] [--model cifar_cnn]
      [--image-size 32] [--batch-size 256] [--steps 20] [--crop pad_crop] [--threads N]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import machine_info, median, write_json  # noqa: E402

__all__ = ["main"]

_DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "shared", "data", "cifar10")


def _parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-dir", default=_DEFAULT_DATA)
  p.add_argument("--split", default="train")
  p.add_argument("--model", default="cifar_cnn")
  p.add_argument("--model-option", action="append", default=[], help="key=value (int/float/str)")
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--crop", default="none", help="loader crop: none, pad_crop, random_resized")
  p.add_argument("--threads", type=int, default=None, help="loader decode threads")
  p.add_argument("--out", default="benchmarks/results/train_e2e.json")
  p.add_argument("--no-tune-malloc", action="store_true", help="skip jcv.perf.tune_malloc")
  return p.parse_args(argv)


def _model_options(pairs) -> dict:
  """``key=value`` strings to a dict, values cast to int or float where they parse as one."""
  options = {}
  for kv in pairs:
    k, _, v = kv.partition("=")
    for cast in (int, float):
      try:
        v = cast(v)
        break
      except ValueError:
        pass
    options[k] = v
  return options


def _setup(args, log):
  """(loader, jitted train step with on-device augmentation, initial state) on the image folder."""
  import jax
  import optax
  import jcv.models
  from jcv.data import augment, pipeline, sources
  from jcv.train.state import create_train_state
  from jcv.train.step import train_step

  source = sources.image_folder(args.data_dir, split=args.split)
  num_classes = len(source.class_names)
  log(f"source: {args.data_dir} [{args.split}], {len(source)} images, {num_classes} classes")
  model = jcv.models.create(args.model, num_classes=num_classes, **_model_options(args.model_option))
  loader = pipeline.train_loader(source, batch_size=args.batch_size, image_size=args.image_size,
                                 seed=0, crop=args.crop, num_threads=args.threads)
  aug = augment.make_augment(["flip", ("pad_crop", {"padding": 2})], num_classes=num_classes)
  step = jax.jit(functools.partial(train_step, num_classes=num_classes, augment_fn=aug),
                 donate_argnums=0)
  state = create_train_state(jax.random.key(0), model, optax.sgd(0.01, momentum=0.9),
                             (1, args.image_size, args.image_size, 3))
  return loader, step, state


def _time_input(it, n: int):
  """(the first batch, seconds per batch of the next ``n``): the input pipeline alone."""
  first = next(it)  # starts the workers, fills caches
  t0 = time.perf_counter()
  for _ in range(n):
    next(it)
  return first, (time.perf_counter() - t0) / n


def _time_step(step, state, batch, n: int):
  """(state, median seconds per step over ``n``, compile seconds): the train step alone."""
  import jax

  t0 = time.perf_counter()
  state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  return state, median(times), compile_s


def _time_end_to_end(step, state, it, n: int):
  """(state, last metrics, seconds per step): loader -> device -> step, blocking only on the
  previous step's loss (asynchronous dispatch)."""
  import jax

  t0 = time.perf_counter()
  pending = None
  for _ in range(n):
    host = next(it)
    batch = jax.device_put({"image": host["image"], "label": host["label"]})
    state, m = step(state, batch)
    if pending is not None:
      jax.block_until_ready(pending)
    pending = m["loss"]
  jax.block_until_ready(pending)
  return state, m, (time.perf_counter() - t0) / n


def main(argv=None):
  """Runs the three measurements and prints/writes a summary dict."""
  args = _parse_args(argv)
  if not args.no_tune_malloc:
    import jcv.perf
    jcv.perf.tune_malloc()
  import jax
  import numpy as np

  info = machine_info()
  log = functools.partial(print, flush=True)
  log(f"# {info['cpu']} x{info['cpu_count']} | load {info['load_avg_1_5_15']} | jax {info['jax']}")
  loader, step, state = _setup(args, log)
  B, n = args.batch_size, args.steps
  it = iter(loader)
  first, input_s = _time_input(it, n)
  log(f"input only: {B / input_s:.1f} img/s ({1e3 * input_s:.1f} ms/batch)")
  batch = jax.device_put({"image": first["image"], "label": first["label"]})
  state, step_s, compile_s = _time_step(step, state, batch, n)
  log(f"step only: {B / step_s:.1f} img/s ({1e3 * step_s:.1f} ms/step, compile {compile_s:.1f} s)")
  state, m, e2e_s = _time_end_to_end(step, state, it, n)
  bottleneck = "input" if input_s > step_s else "step"
  result = {
      "machine": info, "args": vars(args),
      "input_img_per_s": B / input_s, "step_img_per_s": B / step_s, "e2e_img_per_s": B / e2e_s,
      "compile_s": compile_s, "bottleneck": bottleneck,
      "e2e_fraction_of_bottleneck": max(input_s, step_s) / e2e_s,
      "final_loss": float(np.asarray(m["loss"])),
  }
  log(f"end to end: {B / e2e_s:.1f} img/s = {result['e2e_fraction_of_bottleneck']:.0%} of the "
      f"bottleneck ({bottleneck}); input and step share the same cores")
  if hasattr(it, "close"):
    it.close()
  write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
