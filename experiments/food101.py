"""Food-101 (homework 3, the project's main job): fine-tune ImageNet MobileNetV2.

  python experiments/food101.py                                 # tfds food101 (downloads)
  python experiments/food101.py --data-dir ../shared/data/food101_mini \
      --weights ../shared/weights/mobilenet_v2_1.0_224_backbone.npz   # 10 classes, CPU, minutes

Two ways to train, picked by ``--mode`` (default ``auto`` = ``fit``):

- ``fit``: jcv.train.fit on every device with augmentation (random-resized crop, flip,
  colour jitter), Orbax checkpoints and exact resume (rerun the same command). On a GPU/TPU:
  bfloat16, 224 px, 20 epochs, top 3 stages. On a CPU (``RECIPES["cpu_fit"]``, chosen on the
  validation split): the whole network, 192 px, 8 epochs, AdamW 1e-3 for the head and 1e-4
  for the backbone (BatchNorm in inference mode), label smoothing 0.1; food101_mini: val
  80.0%, test top-1 81.4% in 16 min on a shared 2-core CPU (docs/transfer.md).
- ``cached`` (a quicker CPU baseline): the frozen bottom of MobileNetV2 runs once over every
  image (plus its mirror image), then the new head trains alone and, after it, the top
  ``--trainable-stages`` stages with it at a lower learning rate (jcv.train.transfer);
  food101_mini test top-1 78.8% in 6 min.

Both report top-1/top-5 and per-class accuracy on the test split, and write to the workdir:
results.json, confusion.png (confusion matrix), predictions.png (a grid of test images with
predicted and true labels), curves.png, plus a checkpoint usable by
``python -m jcv predict --workdir WORKDIR IMAGE...``. Hyperparameters are chosen on a
validation split carved from train (``--val-fraction``).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("JCV_SHARED", REPO.parent / "shared"))
# Defaults of the options left unset, per mode ("cpu_fit": --mode fit on a CPU, chosen on the
# validation split of food101_mini; see docs/transfer.md).
RECIPES = {
    "cached": {"image_size": 224, "epochs_head": 15, "epochs_finetune": 5, "trainable_stages": 3,
               "finetune_learning_rate": 2e-4, "backbone_lr_multiplier": 0.3},
    "fit": {"image_size": 224, "epochs_head": 15, "epochs_finetune": 5, "trainable_stages": 3,
            "finetune_learning_rate": 2e-4, "backbone_lr_multiplier": 0.3},
    "cpu_fit": {"image_size": 192, "epochs_head": 0, "epochs_finetune": 8, "trainable_stages": 19,
                "finetune_learning_rate": 1e-3, "backbone_lr_multiplier": 0.1},
}
MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # [0, 1] -> [-1, 1], as MobileNetV2 wants


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-dir", default=None,
                 help="image folder root/{train,test}/<class>/<file>; default: tfds food101")
  p.add_argument("--tfds-data-dir", default=None, help="tfds data_dir (default ~/tensorflow_datasets)")
  p.add_argument("--weights", default="mobilenet_v2_1.0_224_no_top",
                 help="a local .npz/.h5 file or a jcv.weights download name")
  p.add_argument("--workdir", default=str(REPO / "runs" / "food101"))
  p.add_argument("--mode", default="auto", choices=("auto", "cached", "fit"))
  p.add_argument("--image-size", type=int, default=None, help="default: see RECIPES")
  p.add_argument("--val-fraction", type=float, default=0.1)
  p.add_argument("--epochs-head", type=int, default=None, help="fit mode: epochs = head + finetune")
  p.add_argument("--epochs-finetune", type=int, default=None)
  p.add_argument("--trainable-stages", type=int, default=None, help="top MobileNetV2 stages to fine-tune (19 = all)")
  p.add_argument("--learning-rate", type=float, default=1e-3, help="head learning rate")
  p.add_argument("--finetune-learning-rate", type=float, default=None, help="fit mode: the head's learning rate")
  p.add_argument("--backbone-lr-multiplier", type=float, default=None)
  p.add_argument("--label-smoothing", type=float, default=0.1)
  p.add_argument("--crop-views", type=int, default=0,
                 help="cached mode: extra random-resized-crop views of every training image")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def _online(host="storage.googleapis.com", port=443, timeout=3.0) -> bool:
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def load_sources(args) -> dict:
  """{"train", "val", "test"} sources from an image folder or tfds food101."""
  from jcv.data import sources
  if args.data_dir:
    if not pathlib.Path(args.data_dir).is_dir():
      raise SystemExit(f"--data-dir {args.data_dir} is not a folder")
    return {"train": sources.image_folder(args.data_dir, split="train", val_fraction=args.val_fraction, seed=args.seed),
            "val": sources.image_folder(args.data_dir, split="val", val_fraction=args.val_fraction, seed=args.seed),
            "test": sources.image_folder(args.data_dir, split="test")}
  import tensorflow_datasets as tfds
  builder = tfds.builder("food101", data_dir=args.tfds_data_dir)
  if not builder.is_prepared() and not _online():
    raise SystemExit(
        "tfds food101 is not downloaded and this machine is offline: run with "
        f"--data-dir {SHARED / 'data' / 'food101_mini'} --weights "
        f"{SHARED / 'weights' / 'mobilenet_v2_1.0_224_backbone.npz'} (or download food101 on a "
        "machine with internet and pass --tfds-data-dir)")
  val = f"train[:{int(args.val_fraction * 100)}%]"
  rest = f"train[{int(args.val_fraction * 100)}%:]"
  get = lambda split: sources.tfds_source("food101", split=split, data_dir=args.tfds_data_dir, download=True)
  return {"train": get(rest), "val": get(val), "test": get("validation")}


def check_weights(args):
  """Fails fast, in one sentence, when the weights are neither local, cached nor downloadable."""
  if pathlib.Path(args.weights).is_file():
    return
  import jcv.weights
  if args.weights not in jcv.weights.known_weights():
    raise SystemExit(f"--weights {args.weights}: no such file and not a known download name")
  url = jcv.weights.download.weight_url(args.weights)
  if (jcv.weights.download.cache_dir() / url.rsplit("/", 1)[-1]).is_file() or _online():
    return
  local = SHARED / "weights" / "mobilenet_v2_1.0_224_backbone.npz"
  if args.data_dir:
    raise SystemExit(f"this machine is offline and the ImageNet weights are not cached: add --weights {local}")
  raise SystemExit("this machine is offline, so neither tfds food101 nor the ImageNet weights can be "
                   f"downloaded: run with --data-dir {SHARED / 'data' / 'food101_mini'} --weights {local}")


def base_config(args, num_classes, **changes):
  from jcv.train import Config
  cfg = Config(dataset=args.data_dir or "food101", data_dir=args.data_dir or args.tfds_data_dir,
               val_fraction=args.val_fraction, train_split="train", eval_split="val",
               image_size=args.image_size, crop="random_resized",
               augment=("flip", ("color_jitter", {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02})),
               model="mobilenet_v2", num_classes=num_classes, batch_size=args.batch_size, seed=args.seed,
               optimizer="adamw", learning_rate=args.learning_rate, weight_decay=1e-4, schedule="cosine",
               label_smoothing=args.label_smoothing, progress=False, **MEAN_STD)
  return cfg.replace(**changes)


# ---------------------------------------------------------------- CPU: cached features


def run_cached(args, srcs, class_names, workdir):
  import jax
  import jcv.weights
  from jcv.train import transfer

  num_classes = len(class_names)
  model, variables = jcv.weights.pretrained("mobilenet_v2", args.weights, num_classes=num_classes, seed=args.seed)
  stages = model.stage_names()
  split = len(stages) - args.trainable_stages
  started = time.time()
  cached = transfer.cache_features(model, variables, srcs, stage=split, image_size=args.image_size,
                                   flip=True, crop_views=args.crop_views, directory=workdir / "features",
                                   **MEAN_STD)
  timing = {"features_s": time.time() - started}
  head_cfg = transfer.transfer_config(base_config(args, num_classes, epochs=args.epochs_head), "frozen",
                                      stage_names=stages)
  head = transfer.cached_transfer(jax.random.key(args.seed), model.clone(**head_cfg.model_options), variables,
                                  cached, stage=split, config=head_cfg)
  timing["head_s"] = head["train_s"]
  history = head["history"]
  final, cfg = head, head_cfg
  if args.epochs_finetune > 0:
    cfg = transfer.transfer_config(
        base_config(args, num_classes, epochs=args.epochs_finetune, learning_rate=args.finetune_learning_rate,
                    warmup_epochs=0.5),
        "finetune", stage_names=stages, trainable_stages=args.trainable_stages,
        backbone_lr_multiplier=args.backbone_lr_multiplier)
    final = transfer.cached_transfer(jax.random.key(args.seed + 1), model.clone(**cfg.model_options),
                                     head["variables"], cached, stage=split, config=cfg)
    timing["finetune_s"] = final["train_s"]
    history = history + [{**h, "epoch": h["epoch"] + args.epochs_head} for h in final["history"]]
  model = model.clone(**cfg.model_options)
  transfer.save_run(workdir, cfg, model, final["variables"], class_names=class_names, metrics=final["val"])
  return {"logits": final["test_logits"], "labels": final["test_labels"], "history": history,
          "timing": timing, "val": final["val"], "head_only_test": head["test"],
          "config": cfg.to_dict()}


# ---------------------------------------------------------------- accelerators: jcv.train.fit


def run_fit(args, srcs, class_names, workdir):
  import jax
  import jcv.weights
  from jcv.data import pipeline
  from jcv.train import fit, loop, transfer

  num_classes = len(class_names)
  model, variables = jcv.weights.pretrained("mobilenet_v2", args.weights, num_classes=num_classes, seed=args.seed)
  accelerated = jax.devices()[0].platform != "cpu"
  cfg = transfer.transfer_config(
      base_config(args, num_classes, epochs=args.epochs_head + args.epochs_finetune,
                  learning_rate=args.finetune_learning_rate, warmup_epochs=1.0,
                  batch_size=max(args.batch_size, 64 * jax.device_count()) if accelerated else args.batch_size,
                  dtype="bfloat16" if accelerated else "float32", num_workers=8 if accelerated else 0),
      "finetune", stage_names=model.stage_names(), trainable_stages=args.trainable_stages,
      backbone_lr_multiplier=args.backbone_lr_multiplier)
  module = model.clone(**cfg.model_options)
  results = fit(cfg, workdir=workdir, train_source=srcs["train"], eval_source=srcs["val"],
                model=transfer.PretrainedModel(module, variables))
  config, _, state, mesh = loop.load_run(workdir, which="latest")
  loader = pipeline.eval_loader(srcs["test"], batch_size=cfg.batch_size, image_size=cfg.image_size)
  logits, labels, _ = loop.collect_logits(state, loader, config, mesh)
  history = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  curve = [{"epoch": r["epoch"], "val_top1": r["top1"], "val_loss": r["loss"]}
           for r in history if r.get("split") == "eval" and "epoch" in r]
  return {"logits": logits, "labels": labels, "history": curve,
          "timing": {"fit_s": results["wall_time_s"]}, "val": results["final"]["eval"],
          "config": cfg.to_dict()}


# ---------------------------------------------------------------- report


def prediction_grid(images, labels, predictions, class_names, path, *, count=16):
  """A grid of test images titled 'predicted / true' (green when right, red when wrong)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = 4
  rows = (min(count, len(images)) + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows))
  for ax in axes.ravel():
    ax.axis("off")
  for ax, image, label, pred in zip(axes.ravel(), images, labels, predictions):
    ax.imshow(image)
    ax.set_title(f"{class_names[pred]}\n(true: {class_names[label]})", fontsize=9,
                 color="green" if pred == label else "red")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def report(args, srcs, class_names, out, workdir, wall_s):
  import numpy as np
  from jcv import plots
  from jcv.data import transforms

  logits, labels = np.asarray(out["logits"]), np.asarray(out["labels"])
  predictions = logits.argmax(-1)
  top5 = (np.argsort(-logits, axis=1)[:, :5] == labels[:, None]).any(axis=1)
  per_class = {name: float((predictions[labels == c] == c).mean()) for c, name in enumerate(class_names)
               if (labels == c).any()}
  results = {"top1": float((predictions == labels).mean()), "top5": float(top5.mean()), "n": int(len(labels)),
             "per_class_top1": per_class, "val": out["val"], "timing": out["timing"], "wall_time_s": wall_s,
             "history": out["history"], "config": out["config"], "mode": args.mode,
             "machine": f"{os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}"}
  if "head_only_test" in out:
    results["head_only_test_top1"] = out["head_only_test"]["top1"]
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.json").write_text(json.dumps(results, indent=1, default=float))
  plots.confusion_matrix(labels, predictions, class_names, workdir / "confusion.png")
  rng = np.random.default_rng(args.seed)
  pick = rng.permutation(len(labels))[:16]
  images = [transforms.eval_resize_crop(srcs["test"][int(i)]["image"], args.image_size) for i in pick]
  prediction_grid(images, labels[pick], predictions[pick], class_names, workdir / "predictions.png")
  if out["history"]:
    plots.training_curves([{"split": "eval", "step": h["epoch"], **{k[4:]: v for k, v in h.items()
                                                                   if k.startswith("val_")}}
                           for h in out["history"]], workdir / "curves.png")
  print(f"test top-1 {results['top1']:.4f}, top-5 {results['top5']:.4f} on {results['n']} images "
        f"in {wall_s:.0f}s")
  for name, acc in per_class.items():
    print(f"  {name:>16s}: {acc:.3f}")
  return results


def main(argv=None):
  args = parse_args(argv)
  started = time.time()
  check_weights(args)
  srcs = load_sources(args)
  class_names = list(srcs["train"].class_names)
  workdir = pathlib.Path(args.workdir)
  if args.mode == "auto":
    args.mode = "fit"
  import jax
  recipe = RECIPES["cpu_fit" if args.mode == "fit" and jax.devices()[0].platform == "cpu" else args.mode]
  for name, value in recipe.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  run = run_cached if args.mode == "cached" else run_fit
  out = run(args, srcs, class_names, workdir)
  report(args, srcs, class_names, out, workdir, time.time() - started)
  return 0


if __name__ == "__main__":
  sys.exit(main())
