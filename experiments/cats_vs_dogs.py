"""Cats vs dogs: lecture 3_1's advanced CNN and notebook 3_2's three MobileNetV2 regimes.

  python experiments/cats_vs_dogs.py                      # every variant + comparison
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

from jcv.data.subsets import subset
from jcv.train import (Augment, Config, Data, FeatureCache, Init, Model, Optim, Phase, Pretrained, Run, build, cli,
                       report)

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


def make_config(args, variant: str) -> Config:
  """The variant's preset on the data, weights and sizes given, then the shared flags and --set."""
  config = PRESETS[variant]
  if config.init.pretrained is not None:
    if args.backbone != "mobilenet_v2" and args.weights == WEIGHTS:
      raise ValueError(f"--backbone {args.backbone} needs its --weights FILE")
    config = config.replace(model={"name": args.backbone}, init={"pretrained": Pretrained(args.weights)},
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


def run(config: Config, folder: pathlib.Path, limit: int | None, *, restart: bool = False) -> dict:
  """Trains one variant in ``folder`` and tests it -> its result.json (``limit``: a seeded
  subset of each split, resized to 96 px)."""
  sources = None
  if limit:
    splits = {"train": config.data.train_split, "eval": config.data.eval_split, "test": report.test_split(config)}
    sources = {k: subset(build.build_source(config, s), limit, seed=config.run.seed, size=96) for k, s in splits.items()}
  return report.fit_and_test(config, folder, sources=sources, restart=restart)


def main(argv=None):
  parser = cli.make_parser(__doc__, presets=PRESETS, default_workdir=str(REPO / "runs" / "cats_vs_dogs"),
                           helps={"preset": "unused here: --variant picks the preset"})
  parser.set_defaults(data_dir=str(SHARED / "data" / "cats_vs_dogs"))
  parser.add_argument("--variant", default="all", choices=tuple(PRESETS) + ("all",),
                      help="which run; all: every variant, then the comparison")
  parser.add_argument("--backbone", default="mobilenet_v2", choices=("mobilenet_v2", "efficientnet_lite2"),
                      help="ImageNet backbone of frozen and finetune; its preprocessing comes with it")
  parser.add_argument("--weights", default=WEIGHTS,
                      help="the backbone's weights: a local .npz/.h5/.pth or a download name (default: MobileNetV2's)")
  parser.add_argument("--image-size", type=int, default=160, help="input size of frozen and finetune")
  parser.add_argument("--scratch-image-size", type=int, default=96, help="input size of scratch and advanced_cnn")
  parser.add_argument("--limit", type=int, help="use only this many images per split, resized to 96 px (smoke tests)")
  parser.add_argument("--force", action="store_true", help="rerun variants that already have a result.json")
  args = parser.parse_args(argv)
  variants = tuple(PRESETS) if args.variant == "all" else (args.variant,)
  try:
    configs = {v: make_config(args, v) for v in variants}  # a bad --set fails now, not after an hour
  except ValueError as e:
    parser.error(str(e))
  if args.print_config:
    return [cli.print_config(c) for c in configs.values()] and 0
  cli.start(args, host_devices="cores")  # multi-host JAX if asked, CPU malloc tuning
  workdir = pathlib.Path(args.workdir)
  for variant, config in configs.items():
    if (workdir / variant / "result.json").exists() and not args.force:
      print(f"{variant}: already done ({workdir / variant / 'result.json'}); --force reruns it")
      continue
    run(config, workdir / variant, args.limit, restart=args.restart)
  if args.variant == "all":
    report.compare_runs(workdir, report.read_rows(workdir, PRESETS), title="cats vs dogs: validation accuracy",
                        columns={"run": "variant", "image_size": "image size", "epochs": "epochs",
                                 "val_top1": "val top-1", "test_top1": "test top-1", "wall_time_s": "wall time (s)"})
  return 0


if __name__ == "__main__":
  sys.exit(cli.guarded_main(main))  # user errors: one line, exit 2; --debug for the traceback
