"""Cats vs dogs: lecture 3_1's advanced CNN and notebook 3_2's three MobileNetV2 regimes.

  python experiments/cats_vs_dogs.py --variant all            # every variant + comparison
  python experiments/cats_vs_dogs.py --variant finetune --image-size 160

Variants: ``advanced_cnn`` (ConvBNAct blocks, dropout, BN, L2 weight decay, trained from
scratch with jcv.train.fit: TensorBoard logs in its workdir), ``scratch`` (MobileNetV2 from a
random init), ``frozen`` (ImageNet MobileNetV2, only a new head trains), ``finetune`` (then
the top ``--trainable-stages`` stages too, at a lower learning rate). ``frozen`` and
``finetune`` cache the frozen part's output once (jcv.train.transfer), so they take minutes
on a CPU. Hyperparameters are chosen on a validation split carved from train
(``--val-fraction``); the test split is only used for the final numbers.

Data: ``--data-dir`` (an image folder root/{train,test}/{cat,dog}; default
../shared/data/cats_vs_dogs) or ``--data-dir tfds:cats_vs_dogs`` (tfds; its train split is
carved into train/val/test). Each variant writes WORKDIR/<variant>/result.json and is skipped
when that exists (``--force`` reruns); ``all`` then writes WORKDIR/comparison.{md,json,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("JCV_SHARED", REPO.parent / "shared"))
VARIANTS = ("frozen", "finetune", "scratch", "advanced_cnn")
MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # [0, 1] -> [-1, 1], as MobileNetV2 wants


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="all", choices=VARIANTS + ("all",))
  p.add_argument("--data-dir", default=str(SHARED / "data" / "cats_vs_dogs"))
  p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_backbone.npz"),
                 help="ImageNet MobileNetV2 weights: a local .npz/.h5 or a jcv.weights download name")
  p.add_argument("--workdir", default=str(REPO / "runs" / "cats_vs_dogs"))
  p.add_argument("--image-size", type=int, default=160)
  p.add_argument("--scratch-image-size", type=int, default=96,
                 help="input size of the from-scratch variants (they are the slow ones on a CPU)")
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--epochs-frozen", type=int, default=20)
  p.add_argument("--epochs-finetune", type=int, default=4)
  p.add_argument("--epochs-scratch", type=int, default=2)
  p.add_argument("--epochs-cnn", type=int, default=2)
  p.add_argument("--trainable-stages", type=int, default=3,
                 help="finetune: how many top stages of MobileNetV2 train (19 = all)")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--limit", type=int, default=None, help="use only this many images per split (smoke tests)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--force", action="store_true", help="rerun variants that already have a result.json")
  return p.parse_args(argv)


def load_sources(args):
  """{"train", "val", "test"} sources; the validation split is carved from train."""
  from jcv.data import sources
  spec = args.data_dir
  if spec.startswith("tfds:"):
    name = spec[len("tfds:"):]
    out = {"train": sources.tfds_source(name, split="train[:70%]"),
           "val": sources.tfds_source(name, split="train[70%:80%]"),
           "test": sources.tfds_source(name, split="train[80%:]")}
  else:
    if not pathlib.Path(spec).is_dir():
      raise SystemExit(f"data folder {spec} not found; pass --data-dir (an image folder) or tfds:cats_vs_dogs")
    out = {split: sources.image_folder(spec, split=split, val_fraction=args.val_fraction, seed=args.seed)
           for split in ("train", "val")}
    out["test"] = sources.image_folder(spec, split="test")
  if args.limit:
    out = {k: _limited(v, args.limit, args.seed) for k, v in out.items()}
  return out


def _limited(source, limit, seed):
  """A seeded random subset of a source (both classes), as 96 px arrays, for quick runs."""
  import numpy as np
  from PIL import Image
  from jcv.data.sources import ArraySource
  idx = np.random.default_rng(seed).permutation(len(source))[:limit]
  records = [source[int(i)] for i in idx]
  images = np.stack([np.asarray(Image.fromarray(r["image"]).resize((96, 96), Image.BILINEAR))
                     for r in records])
  return ArraySource(images, np.array([r["label"] for r in records]), class_names=source.class_names)


def base_config(args, **changes):
  from jcv.train import Config
  cfg = Config(dataset=args.data_dir, data_dir=args.data_dir, val_fraction=args.val_fraction,
               train_split="train", eval_split="val", image_size=args.image_size, crop="random_resized",
               augment=("flip",), num_classes=2, batch_size=args.batch_size, seed=args.seed,
               optimizer="adamw", learning_rate=1e-3, weight_decay=0.0, schedule="cosine",
               progress=False, **MEAN_STD)
  return cfg.replace(**changes)


# ---------------------------------------------------------------- cached MobileNetV2 regimes


def run_cached(args, variants, srcs, workdir):
  """frozen and finetune share one feature cache (the stages below the fine-tuned top)."""
  import jax
  import jcv.weights
  from jcv.train import transfer

  started = time.time()
  model, variables = jcv.weights.pretrained("mobilenet_v2", args.weights, num_classes=2, seed=args.seed)
  stages = model.stage_names()
  split = len(stages) - args.trainable_stages
  cache_started = time.time()
  cached = transfer.cache_features(model, variables, {k: srcs[k] for k in ("train", "val", "test")},
                                   stage=split, image_size=args.image_size, flip=True,
                                   directory=workdir / "features", **MEAN_STD)
  cache_s = time.time() - cache_started
  results = {}
  # frozen: only the head trains (the cached top stages run frozen, in inference mode).
  cfg = transfer.transfer_config(base_config(args, epochs=args.epochs_frozen, learning_rate=1e-3),
                                 "frozen", stage_names=stages)
  out = transfer.cached_transfer(jax.random.key(args.seed), model.clone(**cfg.model_options),
                                 variables, cached, stage=split, config=cfg)
  results["frozen"] = _summary("frozen", out, cfg, cache_s, args.epochs_frozen)
  if "finetune" in variants:
    # finetune: continue from the trained head, unfreeze the top stages at a 10x lower rate.
    cfg = transfer.transfer_config(
        base_config(args, epochs=args.epochs_finetune, learning_rate=1e-4, warmup_epochs=0.5),
        "finetune", stage_names=stages, trainable_stages=args.trainable_stages,
        backbone_lr_multiplier=0.3)
    ft = transfer.cached_transfer(jax.random.key(args.seed + 1), model.clone(**cfg.model_options),
                                  out["variables"], cached, stage=split, config=cfg)
    history = out["history"] + [{**h, "epoch": h["epoch"] + args.epochs_frozen} for h in ft["history"]]
    ft["history"] = history
    ft["train_s"] += out["train_s"]
    results["finetune"] = _summary("finetune", ft, cfg, cache_s, args.epochs_frozen + args.epochs_finetune)
  for name, result in results.items():  # frozen is always run: finetune starts from it
    result["wall_time_s"] = result["train_s"] + cache_s
    _write(workdir / name, result)
  print(f"cached variants done in {time.time() - started:.0f}s")
  return results


def _summary(name, out, cfg, cache_s, epochs):
  return {"variant": name, "val_top1": out["val"]["top1"], "test_top1": out["test"]["top1"],
          "test_loss": out["test"]["loss"], "epochs": epochs, "train_s": out["train_s"],
          "feature_cache_s": cache_s, "history": out["history"], "image_size": cfg.image_size,
          "config": cfg.to_dict()}


# ---------------------------------------------------------------- from scratch with jcv.train.fit


def run_fit(args, name, workdir):
  from jcv.train import fit, loop
  if name == "advanced_cnn":
    cfg = base_config(args, model="advanced_cnn", epochs=args.epochs_cnn, image_size=args.scratch_image_size,
                      weight_decay=1e-4, weight_decay_mode="l2", learning_rate=1e-3)
  else:
    # BN momentum 0.9, not Keras' 0.999: a short run from scratch must move the running statistics.
    cfg = base_config(args, model="mobilenet_v2", epochs=args.epochs_scratch, model_options={"bn_momentum": 0.9},
                      image_size=args.scratch_image_size, learning_rate=2e-3, weight_decay=1e-4)
  run_dir = workdir / name
  results = fit(cfg, workdir=run_dir)
  test = loop.evaluate(run_dir, data_dir=args.data_dir, split="test", which="latest")
  history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
  curve = [{"epoch": r["epoch"], "val_top1": r["top1"], "val_loss": r["loss"]}
           for r in history if r.get("split") == "eval" and "epoch" in r]
  result = {"variant": name, "val_top1": (results["final"]["eval"] or {}).get("top1"),
            "test_top1": test["top1"], "test_loss": test["loss"], "epochs": results["epochs"],
            "train_s": results["wall_time_s"], "wall_time_s": results["wall_time_s"],
            "history": curve, "image_size": cfg.image_size, "config": cfg.to_dict(),
            "train_img_per_s": results["train_img_per_s"]}
  _write(run_dir, result)
  return result


# ---------------------------------------------------------------- comparison


def _write(folder, result):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "result.json").write_text(json.dumps(result, indent=1, default=float))
  print(f"{result['variant']}: val top-1 {result['val_top1']:.4f}, test top-1 {result['test_top1']:.4f}, "
        f"{result['wall_time_s']:.0f}s")


def machine() -> str:
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}"


def compare(workdir):
  """WORKDIR/comparison.{json,md,png} from every variant's result.json."""
  results = []
  for name in VARIANTS:
    f = workdir / name / "result.json"
    if f.exists():
      results.append(json.loads(f.read_text()))
  if not results:
    return None
  lines = ["| variant | image size | epochs | val top-1 | test top-1 | wall time (s) |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in results:
    lines.append(f"| {r['variant']} | {r['image_size']} | {r['epochs']:g} | {r['val_top1']:.4f} | "
                 f"{r['test_top1']:.4f} | {r['wall_time_s']:.0f} |")
  lines.append(f"\nMachine: {machine()}.")
  (workdir / "comparison.md").write_text("\n".join(lines) + "\n")
  (workdir / "comparison.json").write_text(json.dumps(
      [{k: v for k, v in r.items() if k not in ("history", "config")} for r in results], indent=1))
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for r, style in zip(results, ("-o", "--s", "-^", "-d")):
    curve = [h for h in r["history"] if h.get("val_top1") is not None]
    ax.plot([h["epoch"] for h in curve], [h["val_top1"] for h in curve], style, markersize=4,
            label=r["variant"] + (" (continues frozen)" if r["variant"] == "finetune" else ""))
  ax.set_xlabel("epoch")
  ax.set_ylabel("validation top-1")
  ax.set_title("cats vs dogs: validation accuracy")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / "comparison.png", dpi=120)
  plt.close(fig)
  print("\n".join(lines))
  return results


def main(argv=None):
  args = parse_args(argv)
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  wanted = VARIANTS if args.variant == "all" else (args.variant,)
  todo = [v for v in wanted if args.force or not (workdir / v / "result.json").exists()]
  for v in wanted:
    if v not in todo:
      print(f"{v}: already done ({workdir / v / 'result.json'}); --force reruns it")
  cached = [v for v in todo if v in ("frozen", "finetune")]
  if cached:
    run_cached(args, cached, load_sources(args), workdir)
  for v in todo:
    if v in ("scratch", "advanced_cnn"):
      run_fit(args, v, workdir)
  if args.variant == "all":
    compare(workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
