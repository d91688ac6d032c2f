"""Input-pipeline throughput: jcv's grain loaders vs a PyTorch DataLoader, on-device augmentation,
and the training step they feed.

For each dataset in ../shared/data (train split), times images/s of the host pipeline
(decode + resize/crop + flip + batch) with 0, 1 and 2 worker processes:

* ``jcv``: :func:`jcv.data.pipeline.train_loader` (grain; decoding threads in-process, plus
  grain worker processes when workers > 0); ``jcv_1thread``: the same with one thread;
* ``torch``: ``torch.utils.data.DataLoader`` over a Dataset that does the same per-image work
  (the same PIL decode and crop functions), ``shuffle=True, drop_last=True`` — the usual
  PyTorch recipe, minus torchvision (not installed) — if torch is installed. torch runs with
  ``set_num_threads(1)`` (what its workers use anyway): with OpenMP threads, collating a
  batch in the main process took seconds on the loaded 2-core test machine.

CIFAR-10 is decoded once into memory (timed cold and from the .npy cache) and then batched
with vectorised numpy crops. Also times the on-device augmentation per batch
(``jcv.data.augment.make_augment``, jitted) and, for context, one jitted training step
(``jcv.train.step.train_step``) of the model each dataset is meant for, so the pipeline's
img/s can be read next to the step's. Each configuration: warm-up batches (worker start-up
excluded), then the median of ``--rounds`` timed runs of ``--batches`` batches, jcv and torch
interleaved. Usage::

  python benchmarks/data.py [--shared ../shared] [--batches 8] [--rounds 3] [--workers 0 1 2]
                            [--out benchmarks/results/data]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine_info, median, write_json  # noqa: E402
from jcv.data import augment, decode, pipeline, sources  # noqa: E402
from jcv.data import transforms as T  # noqa: E402

__all__ = ["DATASETS", "main"]

# name: (batch size, image size, crop, on-device augment ops, model for the train step)
DATASETS = {
  "cifar10": (128, 32, "pad_crop", ["flip"], "resnet20"),
  "cats_vs_dogs": (32, 160, "random_resized", ["flip", ("color_jitter", {"brightness": 0.2, "contrast": 0.2})],
                   "mobilenet_v2"),
  "food101_mini": (32, 224, "random_resized", ["flip", ("color_jitter", {"brightness": 0.2, "contrast": 0.2})],
                   "mobilenet_v2"),
}


class TorchPeer:
  """A map-style torch Dataset doing jcv's per-image host work (decode, crop, flip)."""

  def __init__(self, src, image_size, crop):
    self.src, self.image_size, self.crop = src, image_size, crop
    self.paths = getattr(src, "paths", None)

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    rng = np.random.default_rng()
    if isinstance(self.src, sources.ArraySource):
      image = self.src.images[i]
    else:
      image = decode.decode_image(self.paths[i])
    if self.crop == "random_resized":
      image = T.random_resized_crop(rng, image, self.image_size)
    else:
      image = T.pad_crop(rng, T.center_crop(T.resize_shorter(image, self.image_size), self.image_size))
    return T.random_flip(rng, image).copy(), int(self.src.labels[i])


def _rate(it, batches, batch_size) -> float:
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch_size / (time.perf_counter() - start)


def _make_iter(impl, src, *, batch_size, image_size, crop, workers):
  if impl.startswith("jcv"):
    threads = 1 if impl == "jcv_1thread" else None
    return iter(pipeline.train_loader(src, batch_size=batch_size, image_size=image_size, seed=0, crop=crop,
                                      flip=True, num_workers=workers, num_threads=threads, process_index=0,
                                      process_count=1))
  import torch  # noqa: PLC0415
  torch.set_num_threads(1)  # collate in the main process: OpenMP spinning on a loaded 2-core box costs seconds
  dl = torch.utils.data.DataLoader(TorchPeer(src, image_size, crop), batch_size=batch_size, shuffle=True,
                                   drop_last=True, num_workers=workers)
  return iter(_forever(dl))


def bench_loaders(src, *, batch_size, image_size, crop, workers, batches, rounds, use_torch):
  """img/s per (impl, workers): median over rounds; jcv and torch alternate, one alive at a time.

  Every timed run uses a fresh iterator: ``warmup`` batches drain the start-up (worker
  launch, first decodes) at full speed, so the timed ``batches`` measure the steady rate,
  not a pre-filled prefetch buffer.
  """
  rows = []
  for w in workers:
    impls = ["jcv"] + (["jcv_1thread"] if w == 0 else []) + (["torch"] if use_torch else [])
    rates = {name: [] for name in impls}
    for _ in range(rounds):
      for name in impls:
        it = _make_iter(name, src, batch_size=batch_size, image_size=image_size, crop=crop, workers=w)
        for _ in range(3):
          next(it)
        rates[name].append(_rate(it, batches, batch_size))
        if hasattr(it, "close"):
          it.close()
        del it
    for name, r in rates.items():
      rows.append({"impl": name, "workers": w, "img_per_s": round(median(r), 1), "runs": [round(x) for x in r]})
  return rows


def _forever(dl):
  while True:
    yield from dl


def bench_augment(ops, *, batch_size, image_size, num_classes, rounds=10):
  """ms per batch of the jitted on-device augmentation (after compilation)."""
  fn = jax.jit(augment.make_augment(ops, num_classes=num_classes))
  x = jnp.zeros((batch_size, image_size, image_size, 3), jnp.uint8)
  y = jnp.zeros((batch_size,), jnp.int32)
  jax.block_until_ready(fn(jax.random.key(0), x, y))
  times = []
  for i in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(i), x, y))
    times.append(time.perf_counter() - start)
  return median(times) * 1e3


def bench_train_step(model_name, *, batch_size, image_size, num_classes, ops, rounds=3):
  """img/s of one jitted jcv train step (augmentation included), or None if unavailable."""
  try:
    import optax  # noqa: PLC0415

    import jcv.models  # noqa: PLC0415
    from jcv.train.state import create_train_state  # noqa: PLC0415
    from jcv.train.step import train_step  # noqa: PLC0415
  except ImportError as e:
    print(f"  train step skipped: {e}")
    return None
  model = jcv.models.create(model_name, num_classes=num_classes)
  state = create_train_state(jax.random.key(0), model, optax.sgd(0.01, momentum=0.9),
                             (1, image_size, image_size, 3))
  aug = augment.make_augment(ops, num_classes=num_classes)
  step = jax.jit(lambda s, b: train_step(s, b, augment_fn=aug, num_classes=num_classes), donate_argnums=0)
  batch = {"image": jnp.zeros((batch_size, image_size, image_size, 3), jnp.uint8),
           "label": jnp.zeros((batch_size,), jnp.int32)}
  state, m = step(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - start)
  return batch_size / median(times)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shared", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared"))
  ap.add_argument("--datasets", nargs="*", default=list(DATASETS))
  ap.add_argument("--workers", nargs="*", type=int, default=[0, 1, 2])
  ap.add_argument("--batches", type=int, default=16, help="batches per timed run")
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--no-torch", action="store_true")
  ap.add_argument("--no-train-step", action="store_true")
  ap.add_argument("--out", default="benchmarks/results/data")
  args = ap.parse_args(argv)
  try:
    import torch  # noqa: F401, PLC0415
    use_torch = not args.no_torch
  except ImportError:
    use_torch = False
  info = machine_info()
  print(f"machine: {info['cpu']} x{info['cpu_count']}, load {info['load_avg_1_5_15']}")
  results = {"machine": info, "datasets": {}}
  for name in args.datasets:
    bs, size, crop, ops, model_name = DATASETS[name]
    root = pathlib.Path(args.shared) / "data" / name
    entry = {"batch_size": bs, "image_size": size, "crop": crop}
    if name == "cifar10":
      with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        src = sources.image_folder(root, split="train", cache=True, cache_dir=tmp)
        entry["decode_all_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        src = sources.image_folder(root, split="train", cache=True, cache_dir=tmp)
        entry["load_cache_s"] = round(time.perf_counter() - start, 2)
      print(f"{name}: decode {len(src)} JPEGs once {entry['decode_all_s']} s; from .npy cache {entry['load_cache_s']} s")
    else:
      src = sources.image_folder(root, split="train", cache=False)
    entry["examples"] = len(src)
    entry["loaders"] = bench_loaders(src, batch_size=bs, image_size=size, crop=crop, workers=args.workers,
                                     batches=args.batches, rounds=args.rounds, use_torch=use_torch)
    for row in entry["loaders"]:
      print(f"  {name} {row['impl']:5s} workers={row['workers']}: {row['img_per_s']:8.1f} img/s  {row['runs']}")
    ms = bench_augment(ops, batch_size=bs, image_size=size, num_classes=len(src.class_names))
    entry["augment_ops"] = [op if isinstance(op, str) else op[0] for op in ops]
    entry["augment_ms_per_batch"] = round(ms, 2)
    entry["augment_img_per_s"] = round(bs / ms * 1e3, 1)
    print(f"  {name} on-device augment {entry['augment_ops']}: {ms:.2f} ms/batch ({entry['augment_img_per_s']} img/s)")
    if not args.no_train_step:
      rate = bench_train_step(model_name, batch_size=bs, image_size=size, num_classes=len(src.class_names), ops=ops)
      entry["train_model"] = model_name
      entry["train_step_img_per_s"] = None if rate is None else round(rate, 1)
      if rate is not None:
        print(f"  {name} train step ({model_name}, B={bs}, {size}px): {rate:.1f} img/s")
    results["datasets"][name] = entry
  results["load_avg_after"] = list(os.getloadavg())
  write_json(f"{args.out}.json", results)
  with open(f"{args.out}.md", "w") as f:
    f.write(markdown(results))
  print(markdown(results))
  return results


def markdown(results) -> str:
  """The results as a markdown table (one row per dataset and worker count)."""
  lines = ["| dataset (batch, px, crop) | workers | jcv img/s | jcv 1 thread img/s | torch img/s | jcv/torch | "
           "on-device aug ms/batch | train step img/s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, e in results["datasets"].items():
    by = {(r["impl"], r["workers"]): r["img_per_s"] for r in e["loaders"]}
    for w in sorted({r["workers"] for r in e["loaders"]}):
      j, t = by.get(("jcv", w)), by.get(("torch", w))
      ratio = f"{j / t:.2f}" if j and t else "-"
      first = w == min(r["workers"] for r in e["loaders"])
      lines.append(
        f"| {name} ({e['batch_size']}, {e['image_size']}, {e['crop']}) | {w} | {j} | "
        f"{by.get(('jcv_1thread', w), '')} | {t if t else '-'} | {ratio} | "
        f"{e['augment_ms_per_batch'] if first else ''} | "
        f"{(str(e.get('train_step_img_per_s')) + ' (' + e.get('train_model', '') + ')') if first and e.get('train_step_img_per_s') else ''} |")
  m = results["machine"]
  lines.append("")
  lines.append(f"Machine: {m['cpu']}, {m['cpu_count']} cores, load average {m['load_avg_1_5_15']} before, "
               f"{results.get('load_avg_after')} after; jax {m['jax']} ({m['backend']}), torch {m.get('torch')}.")
  for name, e in results["datasets"].items():
    if "decode_all_s" in e:
      lines.append(f"{name}: decoding all {e['examples']} JPEGs once took {e['decode_all_s']} s; "
                   f"loading them from the .npy cache {e['load_cache_s']} s.")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
