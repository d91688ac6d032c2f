"""Food-101 (homework 3, the project's main job): fine-tune ImageNet MobileNetV2.

  # food101_mini (10 classes, ../shared): about 15 min on a 2-core CPU
  python experiments/food101.py --data-dir ../shared/data/food101_mini \\
      --weights ../shared/weights/mobilenet_v2_1.0_224_backbone.npz
  # the same, 2 steps at 64 px, as a smoke test (under a minute)
  python experiments/food101.py --data-dir ../shared/data/food101_mini \\
      --weights ../shared/weights/mobilenet_v2_1.0_224_backbone.npz --steps 2 --image-size 64 --workdir /tmp/f
  # tfds food101 (101 classes; downloads about 5 GB)
  python experiments/food101.py

Two ways to train, picked by ``--mode`` (``auto`` = ``fit``); the defaults of each are the
recipe ``RECIPES[--preset][--mode]`` listed below (``--preset``: ``gpu`` when JAX sees a GPU
or TPU, else ``cpu``):

- ``fit``: jcv.train.fit on every device with augmentation (random-resized crop, flip,
  colour jitter), Orbax checkpoints and exact resume (rerun the same command). ``cpu``: the
  whole network, 224 px, 20 epochs, crop area 0.25-1, AdamW 1e-3 for the head and 1e-4 for
  the backbone (BatchNorm in inference mode), label smoothing 0.1; evaluated on the whole
  image at 256 px with flip TTA; food101_mini: val 87.5%, test top-1 85.5% (top-5 98.3%) in
  14.9 min on a quiet 2-core CPU (docs/transfer.md). ``gpu`` (unmeasured): bfloat16, 224 px, 20 epochs, top 3 stages,
  batch 64 per device.
- ``cached`` (a quicker CPU baseline): the frozen bottom of MobileNetV2 runs once over every
  image (plus its mirror image), then the new head trains alone and, after it, the top
  ``--trainable-stages`` stages with it at a lower learning rate (jcv.train.transfer);
  food101_mini test top-1 78.8% in 6 min.

The shared flags mean what they mean in every jcv experiment: ``--epochs`` is the whole run
(fit: the one schedule; cached: head-only + fine-tuning epochs, split as the recipe splits
them unless ``--epochs-head`` says), ``--steps N`` stops after N optimizer steps in all,
``--batch-size`` is global; ``--set key=value`` (any jcv.train.Config field),
``--parallel`` and ``--checkpoint-every`` apply to ``--mode fit``.

Both report top-1/top-5 and per-class accuracy on the test split, and write to the workdir:
results.json, confusion.png (confusion matrix), predictions.png (a grid of test images with
predicted and true labels), curves.png, plus a checkpoint usable by
``python -m jcv predict --workdir WORKDIR IMAGE...``. Hyperparameters are chosen on a
validation split carved from train (``--val-fraction``).
"""
from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time

from jcv.train import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("JCV_SHARED", REPO.parent / "shared"))
# Every default of a run: RECIPES[preset][mode]. A flag given on the command line wins over
# its key (same name); eval_size_ratio (evaluation size = ratio x --image-size; fit mode:
# --set eval_image_size=N overrides), eval_crop_fraction, dtype, num_workers, warmup_epochs and
# weight_decay have no flag (fit mode: --set). In fit mode finetune_learning_rate is the head's rate for the whole run and
# the backbone's is that times backbone_lr_multiplier; in cached mode learning_rate is the
# head-only phase's rate and the first epochs_head of the epochs are that phase.
CACHED = {"image_size": 224, "epochs": 20, "epochs_head": 15, "trainable_stages": 3,
          "learning_rate": 1e-3, "finetune_learning_rate": 2e-4, "backbone_lr_multiplier": 0.3,
          "warmup_epochs": 0.5, "weight_decay": 1e-4, "label_smoothing": 0.1, "batch_size": 32,
          "crop_views": 0}
RECIPES = {
    # cpu fit: chosen on the validation split of food101_mini (docs/transfer.md).
    "cpu": {"fit": {"image_size": 224, "epochs": 20, "trainable_stages": 19, "finetune_learning_rate": 1e-3,
                    "backbone_lr_multiplier": 0.1, "warmup_epochs": 1.0, "weight_decay": 1e-4,
                    "label_smoothing": 0.1, "batch_size": 32, "dtype": "float32", "num_workers": 0,
                    "crop_scale": (0.25, 1.0), "tta_flip": True, "eval_size_ratio": 256 / 224,
                    "eval_crop_fraction": 1.0},
            "cached": CACHED},
    # gpu fit: unmeasured; the batch is 64 per device unless --batch-size says.
    "gpu": {"fit": {"image_size": 224, "epochs": 20, "trainable_stages": 3, "finetune_learning_rate": 2e-4,
                    "backbone_lr_multiplier": 0.3, "warmup_epochs": 1.0, "weight_decay": 1e-4,
                    "label_smoothing": 0.1, "batch_size_per_device": 64, "dtype": "bfloat16",
                    "num_workers": 8, "crop_scale": (0.25, 1.0), "tta_flip": True,
                    "eval_size_ratio": 256 / 224, "eval_crop_fraction": 1.0},
            "cached": CACHED},
}
AUGMENT = ("flip", ("color_jitter", {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}))
MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # [0, 1] -> [-1, 1], as MobileNetV2 wants
CACHED_ONLY = ("epochs_head", "learning_rate", "crop_views")  # flags fit mode has no use for


def _epilog() -> str:
  return cli.describe_presets({f"{preset} {mode}": recipe for preset, modes in RECIPES.items()
                               for mode, recipe in modes.items()},
                              title="recipes (RECIPES[preset][mode]; a flag of the same name overrides its item):")


def make_parser():
  recipe = " (default: the recipe's)"
  p = cli.make_parser(__doc__, presets=RECIPES, default_workdir=str(REPO / "runs" / "food101"),
                      epilog=_epilog(), helps={
      "data_dir": "an image folder root/{train,test}/<class>/<file>, or a tfds data_dir for food101 "
                  "(default: tfds food101 in ~/tensorflow_datasets, downloaded if missing)",
      "preset": "recipe set (see below; default: gpu if JAX sees a GPU/TPU, else cpu)",
      "epochs": "total epochs (fit: the whole schedule; cached: head-only + fine-tuning, see "
                "--epochs-head)" + recipe,
      "seed": "random seed (data split, init, order)",
      "set": "fit mode: any other jcv.train.Config field, e.g. --set weight_decay=5e-4 (repeatable)"})
  p.set_defaults(seed=0)
  p.add_argument("--mode", default="auto", choices=("auto", "cached", "fit"), help="auto = fit")
  p.add_argument("--weights", default="mobilenet_v2_1.0_224_no_top",
                 help="ImageNet MobileNetV2: a local .npz/.h5 file or a jcv.weights download name")
  p.add_argument("--image-size", type=int, help="input size in pixels" + recipe)
  p.add_argument("--val-fraction", type=float, default=0.1, help="validation split carved from train")
  p.add_argument("--trainable-stages", type=int, help="top MobileNetV2 stages to fine-tune (19 = all)" + recipe)
  p.add_argument("--finetune-learning-rate", type=float,
                 help="the head's learning rate while fine-tuning (fit: the whole run)" + recipe)
  p.add_argument("--backbone-lr-multiplier", type=float, help="backbone rate = head rate x this" + recipe)
  p.add_argument("--label-smoothing", type=float, help="label smoothing" + recipe)
  p.add_argument("--epochs-head", type=int,
                 help="cached mode: how many of --epochs train the head alone (default: the recipe's share)")
  p.add_argument("--learning-rate", type=float, help="cached mode: the head-only phase's learning rate" + recipe)
  p.add_argument("--crop-views", type=int,
                 help="cached mode: extra random-resized-crop views of every training image" + recipe)
  return p


def parse_args(argv=None):
  return make_parser().parse_args(argv)


def _online(host="storage.googleapis.com", port=443, timeout=3.0) -> bool:
  try:
    socket.create_connection((host, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def _image_folder(args) -> bool:
  """Whether --data-dir is an image folder (else a tfds data_dir, or unset: tfds food101)."""
  return bool(args.data_dir) and (pathlib.Path(args.data_dir) / "train").is_dir()


def load_sources(args) -> dict:
  """{"train", "val", "test"} sources from an image folder or tfds food101."""
  from jcv.data import sources
  if args.data_dir and not pathlib.Path(args.data_dir).is_dir():
    raise SystemExit(f"--data-dir {args.data_dir} is not a folder (an image folder, or an existing tfds data_dir)")
  if _image_folder(args):
    return {"train": sources.image_folder(args.data_dir, split="train", val_fraction=args.val_fraction, seed=args.seed),
            "val": sources.image_folder(args.data_dir, split="val", val_fraction=args.val_fraction, seed=args.seed),
            "test": sources.image_folder(args.data_dir, split="test")}
  import tensorflow_datasets as tfds
  builder = tfds.builder("food101", data_dir=args.data_dir)
  if not builder.is_prepared() and not _online():
    raise SystemExit(
        "tfds food101 is not downloaded and this machine is offline: run with "
        f"--data-dir {SHARED / 'data' / 'food101_mini'} --weights "
        f"{SHARED / 'weights' / 'mobilenet_v2_1.0_224_backbone.npz'} (or download food101 on a "
        "machine with internet and pass its tfds data_dir as --data-dir)")
  val = f"train[:{int(args.val_fraction * 100)}%]"
  rest = f"train[{int(args.val_fraction * 100)}%:]"
  get = lambda split: sources.tfds_source("food101", split=split, data_dir=args.data_dir, download=True)
  return {"train": get(rest), "val": get(val), "test": get("validation")}


def check_weights(args):
  """Fails fast, in one sentence, when the weights are neither local, cached nor downloadable."""
  if pathlib.Path(args.weights).is_file():
    from jcv.weights.files import check_weight_file
    check_weight_file(args.weights)  # a damaged file fails now, in one line, not after loading data
    return
  import jcv.weights
  if args.weights not in jcv.weights.known_weights():
    raise SystemExit(f"--weights {args.weights}: no such file and not a known download name")
  url = jcv.weights.download.weight_url(args.weights)
  if (jcv.weights.download.cache_dir() / url.rsplit("/", 1)[-1]).is_file() or _online():
    return
  local = SHARED / "weights" / "mobilenet_v2_1.0_224_backbone.npz"
  if _image_folder(args):
    raise SystemExit(f"this machine is offline and the ImageNet weights are not cached: add --weights {local}")
  raise SystemExit("this machine is offline, so neither tfds food101 nor the ImageNet weights can be "
                   f"downloaded: run with --data-dir {SHARED / 'data' / 'food101_mini'} --weights {local}")


def resolve_recipe(args) -> None:
  """Fills every option left unset from RECIPES[args.preset][args.mode] (after jax starts),
  and, in cached mode, splits --epochs into args.epochs_head + args.epochs_finetune."""
  from jcv.train import transfer
  if args.mode == "auto":
    args.mode = "fit"
  if args.preset is None:
    args.preset = cli.backend_preset()
  if args.mode == "fit":
    given = [f"--{name.replace('_', '-')}" for name in CACHED_ONLY if getattr(args, name) is not None]
    if given:
      raise SystemExit(f"{', '.join(given)}: cached mode only (fit mode: --finetune-learning-rate, --epochs)")
  elif cli.fit_only_flags(args):
    raise SystemExit(f"{', '.join(cli.fit_only_flags(args))}: fit mode only (cached mode has flags of its own)")
  recipe = RECIPES[args.preset][args.mode]
  epochs_head = args.epochs_head
  for name, value in recipe.items():
    if getattr(args, name, None) is None:
      setattr(args, name, value)
  if args.batch_size is None:
    import jax
    args.batch_size = args.batch_size_per_device * jax.device_count()
  if args.mode == "fit":
    try:
      cli.apply_args(base_config(args, 1), args)  # a bad --set fails now, not after loading the data
    except ValueError as e:
      raise SystemExit(f"error: {e}")
  else:
    try:
      args.epochs_head, args.epochs_finetune = transfer.split_epochs(
          args.epochs, epochs_head, recipe=(recipe["epochs"], recipe["epochs_head"]))
    except ValueError as e:
      raise SystemExit(f"--epochs-head: {e}")


def _eval_size(args):
  """Evaluation size: the recipe's eval_size_ratio x --image-size (None: the training size)."""
  ratio = getattr(args, "eval_size_ratio", None)
  return int(round(args.image_size * ratio)) if ratio else None


def base_config(args, num_classes, **changes):
  from jcv.train import Config
  cfg = Config(dataset=args.data_dir if _image_folder(args) else "food101", data_dir=args.data_dir,
               val_fraction=args.val_fraction, train_split="train", eval_split="val",
               image_size=args.image_size, crop="random_resized", augment=AUGMENT,
               crop_scale=getattr(args, "crop_scale", (0.08, 1.0)), tta_flip=getattr(args, "tta_flip", False),
               eval_image_size=_eval_size(args),
               eval_crop_fraction=getattr(args, "eval_crop_fraction", 0.875),
               model="mobilenet_v2", num_classes=num_classes, batch_size=args.batch_size, seed=args.seed,
               optimizer="adamw", weight_decay=args.weight_decay, schedule="cosine",
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
  epochs_head, epochs_finetune = args.epochs_head, args.epochs_finetune
  steps_head, steps_finetune = transfer.split_steps(args.steps, epochs_head, examples=len(cached["train"][1]),
                                                    batch_size=args.batch_size)
  head_cfg = transfer.transfer_config(
      base_config(args, num_classes, epochs=epochs_head, steps=steps_head, learning_rate=args.learning_rate),
      "frozen", stage_names=stages)
  head = transfer.cached_transfer(jax.random.key(args.seed), model.clone(**head_cfg.model_options), variables,
                                  cached, stage=split, config=head_cfg)
  timing["head_s"] = head["train_s"]
  history = head["history"]
  final, cfg = head, head_cfg
  if epochs_finetune > 0 and steps_finetune != 0:
    cfg = transfer.transfer_config(
        base_config(args, num_classes, epochs=epochs_finetune, steps=steps_finetune,
                    learning_rate=args.finetune_learning_rate, warmup_epochs=args.warmup_epochs),
        "finetune", stage_names=stages, trainable_stages=args.trainable_stages,
        backbone_lr_multiplier=args.backbone_lr_multiplier)
    final = transfer.cached_transfer(jax.random.key(args.seed + 1), model.clone(**cfg.model_options),
                                     head["variables"], cached, stage=split, config=cfg)
    timing["finetune_s"] = final["train_s"]
    history = history + [{**h, "epoch": h["epoch"] + epochs_head} for h in final["history"]]
  model = model.clone(**cfg.model_options)
  transfer.save_run(workdir, cfg, model, final["variables"], class_names=class_names, metrics=final["val"])
  return {"logits": final["test_logits"], "labels": final["test_labels"], "history": history,
          "timing": timing, "val": final["val"], "head_only_test": head["test"],
          "config": cfg.to_dict()}


# ---------------------------------------------------------------- every device: jcv.train.fit


def run_fit(args, srcs, class_names, workdir):
  import jcv.weights
  from jcv.data import pipeline
  from jcv.train import fit, loop, transfer

  num_classes = len(class_names)
  model, variables = jcv.weights.pretrained("mobilenet_v2", args.weights, num_classes=num_classes, seed=args.seed)
  cfg = transfer.transfer_config(
      base_config(args, num_classes, epochs=args.epochs, learning_rate=args.finetune_learning_rate,
                  warmup_epochs=args.warmup_epochs, dtype=args.dtype, num_workers=args.num_workers),
      "finetune", stage_names=model.stage_names(), trainable_stages=args.trainable_stages,
      backbone_lr_multiplier=args.backbone_lr_multiplier)
  try:
    cfg = cli.apply_args(cfg, args)  # --steps, --parallel, --checkpoint-every, --set ...
  except ValueError as e:
    raise SystemExit(f"error: {e}")
  module = model.clone(**cfg.model_options)
  results = fit(cfg, workdir=workdir, train_source=srcs["train"], eval_source=srcs["val"],
                model=transfer.PretrainedModel(module, variables), restart=args.restart)
  config, _, state, mesh = loop.load_run(workdir, which="latest")
  loader = pipeline.eval_loader(srcs["test"], batch_size=cfg.batch_size, **loop.eval_view(cfg))
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
  config = out["config"]  # the view the test images were evaluated with
  size, fraction = config.get("eval_image_size") or args.image_size, config.get("eval_crop_fraction", 0.875)
  images = [transforms.eval_resize_crop(srcs["test"][int(i)]["image"], size, crop_fraction=fraction) for i in pick]
  prediction_grid(images, labels[pick], predictions[pick], class_names, workdir / "predictions.png")
  if (workdir / "metrics.jsonl").exists():  # fit mode: train and eval curves and the lr, by step
    from jcv.train import log as log_lib
    plots.training_curves(log_lib.read_jsonl(workdir / "metrics.jsonl"), workdir / "curves.png")
  elif out["history"]:  # cached mode: validation per epoch
    plots.training_curves([{"split": "eval", "epoch": h["epoch"], **{k[4:]: v for k, v in h.items()
                                                                    if k.startswith("val_")}}
                           for h in out["history"]], workdir / "curves.png", x="epoch")
  print(f"test top-1 {results['top1']:.4f}, top-5 {results['top5']:.4f} on {results['n']} images "
        f"in {wall_s:.0f}s")
  for name, acc in per_class.items():
    print(f"  {name:>16s}: {acc:.3f}")
  return results


def main(argv=None):
  args = parse_args(argv)
  cli.start(args, host_devices="cores")  # multi-host JAX if asked, CPU malloc tuning
  started = time.time()
  resolve_recipe(args)
  check_weights(args)
  srcs = load_sources(args)
  class_names = list(srcs["train"].class_names)
  workdir = pathlib.Path(args.workdir)
  run = run_cached if args.mode == "cached" else run_fit
  out = run(args, srcs, class_names, workdir)
  report(args, srcs, class_names, out, workdir, time.time() - started)
  return 0


if __name__ == "__main__":
  sys.exit(cli.guarded_main(main))  # user errors: one line, exit 2; --debug for the traceback
