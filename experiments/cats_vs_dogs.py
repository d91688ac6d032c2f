"""Cats vs dogs: lecture 3_1's advanced CNN and notebook 3_2's three MobileNetV2 regimes.

  python experiments/cats_vs_dogs.py                      # every variant + comparison (about 70 min)
  python experiments/cats_vs_dogs.py --variant finetune --image-size 224
  python experiments/cats_vs_dogs.py --variant frozen --steps 2 --limit 64 --workdir /tmp/c   # smoke test

Variants (one run each; ``--variant all``, the default, runs every one and compares them):

- ``frozen``: ImageNet MobileNetV2, only a new head trains. 98.1% test top-1.
- ``finetune``: continues from the frozen head; the top ``--trainable-stages`` stages train
  too, at a lower learning rate (BatchNorm in inference mode). 98.4%.
- ``scratch``: MobileNetV2 from a random init, 96 px, 2 epochs. 63.2%.
- ``advanced_cnn``: the lecture's CNN (ConvBNAct blocks, dropout, BN, L2 weight decay) from
  scratch, 96 px, 2 epochs. 64.9%.

``frozen`` and ``finetune`` cache the frozen part's output once (jcv.train.transfer), so they
take minutes on a CPU (measured 17 and 28 min with the cache at load 16-19); ``scratch`` and
``advanced_cnn`` train with jcv.train.fit (6 and 37 min), with TensorBoard logs in their
workdir. Hyperparameters are chosen on a validation split carved from train
(``--val-fraction``); the test split is only used for the final numbers. Each variant's
defaults are its recipe, listed below.

Shared flags, as in every jcv experiment: ``--epochs N`` is each selected variant's whole run
(``finetune``: head-only + fine-tuning epochs, split as its recipe splits them unless
``--epochs-head`` says), ``--steps N`` stops each run after N optimizer steps in all,
``--batch-size`` is global; ``--set key=value`` (any jcv.train.Config field), ``--parallel``
and ``--checkpoint-every`` apply to the jcv.train.fit variants (``scratch``, ``advanced_cnn``).

Data: ``--data-dir``, an image folder root/{train,test}/{cat,dog} (default
../shared/data/cats_vs_dogs) or a tfds data_dir holding ``cats_vs_dogs`` (its train split is
carved into train/val/test). Each variant writes WORKDIR/<variant>/result.json and is skipped
when that exists (``--force`` reruns); ``all`` then writes WORKDIR/comparison.{md,json,png}.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

from jcv.train import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("JCV_SHARED", REPO.parent / "shared"))
VARIANTS = ("frozen", "finetune", "scratch", "advanced_cnn")
CACHED_VARIANTS = ("frozen", "finetune")
# Each variant's defaults (measured: README, docs/transfer.md): Config fields, plus, for
# finetune, how many of its epochs are the head-only phase (the frozen variant's run).
RECIPES = {"cpu": {
    "frozen": {"epochs": 20, "learning_rate": 1e-3},
    "finetune": {"epochs": 24, "epochs_head": 20, "learning_rate": 1e-4, "warmup_epochs": 0.5,
                 "backbone_lr_multiplier": 0.3},
    # BN momentum 0.9, not Keras' 0.999: a short run from scratch must move the running statistics.
    "scratch": {"epochs": 2, "model": "mobilenet_v2", "model_options": {"bn_momentum": 0.9},
                "learning_rate": 2e-3, "weight_decay": 1e-4},
    "advanced_cnn": {"epochs": 2, "model": "advanced_cnn", "learning_rate": 1e-3, "weight_decay": 1e-4,
                     "weight_decay_mode": "l2"},
}}
MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # [0, 1] -> [-1, 1], as MobileNetV2 wants


def make_parser():
  p = cli.make_parser(
      __doc__, presets=RECIPES, default_preset="cpu", default_workdir=str(REPO / "runs" / "cats_vs_dogs"),
      epilog=cli.describe_presets(RECIPES["cpu"], title="recipes (preset cpu, the only one, measured on a CPU; "
                                  "finetune's first epochs_head epochs are the frozen recipe):"),
      helps={"data_dir": "an image folder root/{train,test}/{cat,dog}, or a tfds data_dir holding cats_vs_dogs",
             "preset": "recipe set (below)",
             "epochs": "total epochs of each selected variant's run (finetune: head-only + fine-tuning, "
                       "see --epochs-head); default: the recipe's",
             "seed": "random seed (data split, init, order)",
             "set": "scratch/advanced_cnn: any other jcv.train.Config field, e.g. --set "
                    "label_smoothing=0.1 (repeatable)"})
  p.set_defaults(data_dir=str(SHARED / "data" / "cats_vs_dogs"), batch_size=32, seed=0)
  p.add_argument("--variant", default="all", choices=VARIANTS + ("all",),
                 help="which run; all: every variant, then the comparison")
  p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_backbone.npz"),
                 help="ImageNet MobileNetV2 weights: a local .npz/.h5 or a jcv.weights download name")
  p.add_argument("--image-size", type=int, default=160, help="input size of frozen and finetune")
  p.add_argument("--scratch-image-size", type=int, default=96,
                 help="input size of the from-scratch variants (they are the slow ones on a CPU)")
  p.add_argument("--val-fraction", type=float, default=0.1, help="validation split carved from train")
  p.add_argument("--trainable-stages", type=int, default=3,
                 help="finetune: how many top stages of MobileNetV2 train (19 = all)")
  p.add_argument("--epochs-head", type=int,
                 help="finetune: how many of its epochs train the head alone (default: the recipe's share)")
  p.add_argument("--limit", type=int, default=None,
                 help="use only this many images per split, resized to 96 px (smoke tests)")
  p.add_argument("--force", action="store_true", help="rerun variants that already have a result.json")
  return p


def parse_args(argv=None):
  return make_parser().parse_args(argv)


def _is_image_folder(path) -> bool:
  return (pathlib.Path(path) / "train").is_dir()


def load_sources(args):
  """{"train", "val", "test"} sources; the validation split is carved from train."""
  from jcv.data import sources
  spec = args.data_dir
  if not pathlib.Path(spec).is_dir():
    raise SystemExit(f"--data-dir {spec} not found: pass an image folder or a tfds data_dir")
  if _is_image_folder(spec):
    out = {split: sources.image_folder(spec, split=split, val_fraction=args.val_fraction, seed=args.seed)
           for split in ("train", "val")}
    out["test"] = sources.image_folder(spec, split="test")
  else:
    get = lambda split: sources.tfds_source("cats_vs_dogs", split=split, data_dir=spec)
    out = {"train": get("train[:70%]"), "val": get("train[70%:80%]"), "test": get("train[80%:]")}
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
  folder = _is_image_folder(args.data_dir)
  cfg = Config(dataset=args.data_dir if folder else "cats_vs_dogs", data_dir=args.data_dir,
               val_fraction=args.val_fraction if folder else None,
               train_split="train" if folder else "train[:70%]", eval_split="val" if folder else "train[70%:80%]",
               image_size=args.image_size, crop="random_resized",
               augment=("flip",), num_classes=2, batch_size=args.batch_size, seed=args.seed,
               optimizer="adamw", learning_rate=1e-3, weight_decay=0.0, schedule="cosine",
               progress=False, **MEAN_STD)
  return cfg.replace(**changes)


def recipe(args, variant) -> dict:
  """The variant's Config fields from RECIPES, its epochs (the whole run) replaced by --epochs."""
  fields = {k: v for k, v in RECIPES[args.preset][variant].items()
            if k not in ("epochs_head", "backbone_lr_multiplier")}
  if args.epochs is not None:
    fields["epochs"] = args.epochs
  return fields


def finetune_epochs(args) -> tuple[int, int]:
  """(head-only, fine-tuning) epochs of the finetune variant."""
  from jcv.train import transfer
  r = RECIPES[args.preset]["finetune"]
  try:
    return transfer.split_epochs(recipe(args, "finetune")["epochs"], args.epochs_head,
                                 recipe=(r["epochs"], r["epochs_head"]))
  except ValueError as e:
    raise SystemExit(f"--epochs-head: {e}")


# ---------------------------------------------------------------- cached MobileNetV2 regimes


def run_cached(args, variants, srcs, workdir):
  """frozen and finetune share one feature cache (the stages below the fine-tuned top) and,
  when its length is the frozen run's, finetune starts from the frozen variant's head."""
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
  heads = {}

  def head(epochs, steps):
    """The head-only run (the frozen variant's recipe), trained once per length."""
    if (epochs, steps) not in heads:
      cfg = transfer.transfer_config(base_config(args, **{**recipe(args, "frozen"), "epochs": epochs}, steps=steps),
                                     "frozen", stage_names=stages)
      heads[epochs, steps] = cfg, transfer.cached_transfer(
          jax.random.key(args.seed), model.clone(**cfg.model_options), variables, cached, stage=split, config=cfg)
    return heads[epochs, steps]

  results = {}
  frozen_length = (recipe(args, "frozen")["epochs"], args.steps)
  if "frozen" in variants:
    cfg, out = head(*frozen_length)
    results["frozen"] = _summary("frozen", out, cfg, cache_s, cfg.epochs)
  if "finetune" in variants:
    epochs_head, epochs_ft = finetune_epochs(args)
    steps_head, steps_ft = transfer.split_steps(args.steps, epochs_head, examples=len(cached["train"][1]),
                                                batch_size=args.batch_size)
    cfg, out = head(epochs_head, steps_head)
    if (epochs_head, steps_head) == frozen_length and "frozen" not in results:
      results["frozen"] = _summary("frozen", out, cfg, cache_s, epochs_head)  # it is that run
    if epochs_ft and steps_ft != 0:
      # Continue from the trained head, unfreeze the top stages at a lower rate.
      cfg = transfer.transfer_config(
          base_config(args, **{**recipe(args, "finetune"), "epochs": epochs_ft}, steps=steps_ft),
          "finetune", stage_names=stages, trainable_stages=args.trainable_stages,
          backbone_lr_multiplier=RECIPES[args.preset]["finetune"]["backbone_lr_multiplier"])
      ft = transfer.cached_transfer(jax.random.key(args.seed + 1), model.clone(**cfg.model_options),
                                    out["variables"], cached, stage=split, config=cfg)
      ft["history"] = out["history"] + [{**h, "epoch": h["epoch"] + epochs_head} for h in ft["history"]]
      ft["train_s"] += out["train_s"]
      out = ft
    results["finetune"] = _summary("finetune", out, cfg, cache_s, epochs_head + epochs_ft)
  for name, result in results.items():
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


def run_fit(args, name, srcs, workdir):
  from jcv.train import fit, loop
  cfg = cli.apply_args(base_config(args, **recipe(args, name), image_size=args.scratch_image_size), args)
  run_dir = workdir / name
  results = fit(cfg, workdir=run_dir, train_source=srcs["train"], eval_source=srcs["val"], restart=args.restart)
  test = loop.evaluate(run_dir, split="test", which="latest", source=srcs["test"])
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
  parser = make_parser()
  args = parser.parse_args(argv)
  wanted = VARIANTS if args.variant == "all" else (args.variant,)
  fit_only = cli.fit_only_flags(args)
  if fit_only and not set(wanted) - set(CACHED_VARIANTS):
    parser.error(f"{', '.join(fit_only)}: only the jcv.train.fit variants (scratch, advanced_cnn) use them")
  if fit_only and set(wanted) & set(CACHED_VARIANTS):
    print(f"note: only scratch and advanced_cnn use {', '.join(fit_only)}")
  try:
    cli.apply_args(base_config(args), args)  # a bad --set fails now, not after an hour
  except ValueError as e:
    parser.error(str(e))
  if "finetune" in wanted:
    finetune_epochs(args)  # likewise a bad --epochs-head
  cli.start(args, host_devices="cores")  # multi-host JAX if asked, CPU malloc tuning
  workdir = pathlib.Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  todo = [v for v in wanted if args.force or not (workdir / v / "result.json").exists()]
  for v in wanted:
    if v not in todo:
      print(f"{v}: already done ({workdir / v / 'result.json'}); --force reruns it")
  srcs = load_sources(args) if todo else None
  cached = [v for v in todo if v in CACHED_VARIANTS]
  if cached:
    run_cached(args, cached, srcs, workdir)
  for v in todo:
    if v not in CACHED_VARIANTS:
      run_fit(args, v, srcs, workdir)
  if args.variant == "all":
    compare(workdir)
  return 0


if __name__ == "__main__":
  sys.exit(cli.guarded_main(main))  # user errors: one line, exit 2; --debug for the traceback
