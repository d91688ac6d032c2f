"""Cats vs dogs: lecture 3_1's advanced CNN and notebook 3_2's three MobileNetV2 regimes.

  python experiments/cats_vs_dogs.py                      # every variant + comparison (4-11 min on 2 CPU cores)
  python experiments/cats_vs_dogs.py --variant like_for_like   # both backbones' three regimes alike
  python experiments/cats_vs_dogs.py --variant finetune --image-size 224
  python experiments/cats_vs_dogs.py --variant frozen --steps 2 --limit 64 --workdir /tmp/c   # smoke test
  python experiments/cats_vs_dogs.py --variant finetune --print-config
  python experiments/cats_vs_dogs.py --variant finetune --backbone efficientnet_lite2 \
      --weights ../shared/weights/efficientnet_lite2.npz --workdir runs/cats_lite2

Variants (each a Config preset and a run folder WORKDIR/<variant> that ``python -m jcv
evaluate|predict`` accept; ``all``, the default, runs every one and compares them):
- ``frozen``: ImageNet MobileNetV2, only a new head trains, on features of the frozen backbone
  computed once (below the top 3 stages, in WORKDIR/features, shared with ``finetune``, then pooled).
- ``finetune``: the frozen run's 20 epochs, then 4 more with the top 3 stages training at a
  lower rate (BatchNorm in inference mode).
- ``scratch``: MobileNetV2 from a random init, 96 px, 2 epochs.
- ``advanced_cnn``: the lecture's CNN (ConvBNAct blocks, dropout, BN, L2 weight decay) from
  scratch, 96 px, 2 epochs.
``like_for_like`` (not in ``all``): for each backbone (or --backbone's), scratch, frozen and finetune
(jcv.train.compare.regime_configs) on one recipe: 160 px, 6 epochs, random-resized crops, flip, AdamW 1e-3
(WORKDIR/<backbone>/same_epochs), then --minutes-per-run of training each (WORKDIR/<backbone>/same_time).
Measured accuracy and time of each: README.md. Hyperparameters were chosen on a validation split carved from train; the test split gives the
final numbers. ``--data-dir``: an image folder root/{train,test}/{cat,dog} (default
../shared/data/cats_vs_dogs) or a tfds data_dir holding ``cats_vs_dogs``. A variant with a
WORKDIR/<variant>/result.json is skipped (``--force`` reruns it); ``all`` then writes
WORKDIR/comparison.{md,json,png}.
"""
from __future__ import annotations

import os
import pathlib
import sys

from jcv.train import (Augment, Config, Data, FeatureCache, Init, Model, Optim, Phase, Pretrained, Run, build, cli,
                       compare, report)

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("JCV_SHARED", REPO.parent / "shared"))
WEIGHTS = str(SHARED / "weights" / "mobilenet_v2_1.0_224_backbone.npz")
BASE = Config(
    data=Data(dataset="cats_vs_dogs", train_split="train[:70%]", eval_split="train[70%:80%]", image_size=160,
              crop="random_resized", batch_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
    augment=Augment(ops=("flip",)), model=Model(name="mobilenet_v2", num_classes=2),
    optim=Optim(name="adamw", learning_rate=1e-3, weight_decay=0.0), run=Run(progress=False))
FROZEN = BASE.replace(data={"mean": "pretrained", "std": "pretrained"}, run={"length": "20 epochs"},
                      init=Init(pretrained=Pretrained(WEIGHTS), trainable="head",
                                feature_cache=FeatureCache(flip=True, stage=-3)))
FINETUNE = FROZEN.replace(run={"length": "24 epochs", "phases": (
    Phase(length="20 epochs", trainable="head"),
    Phase(length="4 epochs", trainable=3, learning_rate=1e-4, backbone_lr_multiplier=0.3, warmup="0.5 epochs"))})
# BN momentum 0.9, not Keras' 0.999: a short run from scratch must move the running statistics.
SCRATCH = BASE.replace(data={"image_size": 96}, run={"length": "2 epochs"}, model={"options": {"bn_momentum": 0.9}},
                       optim={"learning_rate": 2e-3, "weight_decay": 1e-4})
ADVANCED_CNN = BASE.replace(data={"image_size": 96}, run={"length": "2 epochs"}, model={"name": "advanced_cnn"},
                            optim={"weight_decay": 1e-4, "weight_decay_mode": "l2"})
PRESETS = {"frozen": FROZEN, "finetune": FINETUNE, "scratch": SCRATCH, "advanced_cnn": ADVANCED_CNN}
# One recipe for the three regimes; BN momentum 0.9 moves scratch's statistics (the others keep BN frozen).
LIKE_FOR_LIKE = BASE.replace(data={"mean": "pretrained", "std": "pretrained"}, model={"options": {"bn_momentum": 0.9}},
                             init=Init(pretrained=Pretrained(WEIGHTS)), schedule={"warmup": "0.5 epochs"},
                             run={"length": "6 epochs"})
BACKBONES = {"mobilenet_v2": WEIGHTS, "efficientnet_lite2": str(SHARED / "weights" / "efficientnet_lite2.npz")}


def make_config(args, variant: str, backbone: str | None = None, weights: str | None = None) -> Config:
  """The variant's preset on the data, weights and sizes given, then the shared flags and --set."""
  config, backbone, weights = PRESETS.get(variant, LIKE_FOR_LIKE), backbone or args.backbone or "mobilenet_v2", weights or args.weights
  if config.init.pretrained is not None:
    if backbone != "mobilenet_v2" and weights == WEIGHTS:
      raise ValueError(f"--backbone {backbone} needs its --weights FILE")
    config = config.replace(model={"name": backbone}, init={"pretrained": Pretrained(weights)},
                            data={"image_size": args.image_size})
  elif args.scratch_image_size:
    config = config.replace(data={"image_size": args.scratch_image_size})
  if build.is_image_folder(args.data_dir):
    config = config.replace(data={"dataset": args.data_dir, "train_split": "train", "eval_split": "val",
                                  "val_fraction": 0.1})
  if config.init.feature_cache is not None:  # frozen and finetune share the features below the top 3 stages
    directory = str(pathlib.Path(args.workdir).absolute() / "features")
    config = config.replace(init={"feature_cache": FeatureCache(flip=True, stage=-3, directory=directory)})
  return cli.apply_args(config, args)


def like_for_like(args) -> dict:
  """{backbone: its scratch, frozen and finetune configs (jcv.train.compare.regime_configs)}: --backbone's, else both."""
  pairs = BACKBONES.items() if args.backbone is None else [(args.backbone, args.weights)]
  return {b: compare.regime_configs(make_config(args, "like_for_like", b, w), w) for b, w in pairs}


def main(argv=None):
  parser = cli.make_parser(__doc__, presets=PRESETS, default_workdir=str(REPO / "runs" / "cats_vs_dogs"),
                           helps={"preset": "unused here: --variant picks the preset"})
  parser.set_defaults(data_dir=str(SHARED / "data" / "cats_vs_dogs"))
  parser.add_argument("--variant", default="all", choices=tuple(PRESETS) + ("all", "like_for_like"),
                      help="which run; all: every variant, then the comparison")
  parser.add_argument("--backbone", choices=tuple(BACKBONES), help="ImageNet backbone of frozen and finetune (default: "
                      "mobilenet_v2; like_for_like: both); its preprocessing comes with it")
  parser.add_argument("--weights", default=WEIGHTS,
                      help="the backbone's weights: a local .npz/.h5/.pth or a download name (default: MobileNetV2's)")
  parser.add_argument("--image-size", type=int, default=160, help="input size of frozen and finetune")
  parser.add_argument("--scratch-image-size", type=int, default=96, help="input size of scratch and advanced_cnn")
  parser.add_argument("--limit", type=int, help="use only this many images per split, resized to 96 px (smoke tests)")
  parser.add_argument("--force", action="store_true", help="rerun variants that already have a result.json")
  parser.add_argument("--minutes-per-run", type=float, default=3.0, help="like_for_like: training time of each "
                      "regime in the same-time table (0: no such table)")
  args = parser.parse_args(argv)
  variants = tuple(PRESETS) if args.variant == "all" else (args.variant,)
  try:  # a bad --set fails now, not after an hour
    groups = like_for_like(args) if args.variant == "like_for_like" else {"": {v: make_config(args, v) for v in variants}}
  except ValueError as e:
    parser.error(str(e))
  if args.print_config:
    return [cli.print_config(c) for configs in groups.values() for c in configs.values()] and 0
  cli.start(args, host_devices="cores")  # multi-host JAX if asked, CPU malloc tuning
  workdir = pathlib.Path(args.workdir)
  for backbone, configs in groups.items() if args.variant == "like_for_like" else ():  # WORKDIR/<backbone>/same_*
    sources = report.subset_sources(configs["scratch"], args.limit, size=96) if args.limit else None
    compare.compare_regimes(configs, workdir / backbone, minutes=args.minutes_per_run, sources=sources, force=args.force,
                            restart=args.restart, title=backbone)
  for variant, config in groups.get("", {}).items():
    if (workdir / variant / "result.json").exists() and not args.force:
      print(f"{variant}: already done ({workdir / variant / 'result.json'}); --force reruns it")
      continue
    sources = report.subset_sources(config, args.limit, size=96) if args.limit else None  # seeded, 96 px
    report.fit_and_test(config, workdir / variant, sources=sources, restart=args.restart)
  if args.variant == "all":
    report.compare_runs(workdir, report.read_rows(workdir, PRESETS), title="cats vs dogs: validation accuracy",
                        columns={"run": "variant", "image_size": "image size", "epochs": "epochs",
                                 "val_top1": "val top-1", "test_top1": "test top-1", "wall_time_s": "wall time (s)"})
  return 0


if __name__ == "__main__":
  sys.exit(cli.guarded_main(main))  # user errors: one line, exit 2; --debug for the traceback
