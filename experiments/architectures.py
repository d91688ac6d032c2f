"""The lecture's architectures trained from scratch side by side (docs/models.md, "Trained side by side").

  python experiments/architectures.py --workdir runs/arch                 # cpu: every family, 2 min each (~59 min on 2 cores)
  python experiments/architectures.py --workdir runs/arch --models resnet18,vgg16_bn --minutes-per-model 5
  python experiments/architectures.py --preset gpu --workdir runs/arch_gpu   # the same at a larger budget (unmeasured)

Every model of jcv.train.compare.LECTURE_MODELS gets the same data (CIFAR-10, 500 training images held out
for validation; gpu: 5,000), input size (75 px, the smallest size every family accepts: compare.smallest_common_size), augmentation
(flip, translate), recipe (AdamW 1e-3, clipped, 5 % warmup, cosine) and training time, its own step timed on this
machine (jcv.train.budget): equal time is what a student has. Tested on 2,000 seeded test images (gpu: all 10,000).
WORKDIR/comparison.{md,json,png}: params, FLOPs/image, train img/s, wall time, best val and test top-1, diverged rows.
"""
from __future__ import annotations

import os
import pathlib
import sys

from jcv.train import Augment, Config, Data, Evaluation, Optim, Run, cli, compare

SHARED = pathlib.Path(os.environ.get("JCV_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
CPU = Config(data=Data(eval_split="val", val_fraction=0.01, image_size=75, batch_size=64),  # CIFAR-10 upsampled
             augment=Augment(ops=("flip", ("pad_crop", {"padding": 9}))),  # CIFAR's 4 px at 75/32
             optim=Optim(name="adamw", learning_rate=1e-3, weight_decay=0.05, grad_clip_norm=1.0),
             evaluation=Evaluation(crop_fraction=1.0), run=Run(progress=False))
PRESETS = {"cpu": CPU, "gpu": CPU.replace(data={"batch_size": 256, "val_fraction": 0.1, "num_workers": 8}, model={"dtype": "bfloat16"})}
BUDGETS = {"cpu": (2.0, 2000), "gpu": (5.0, None)}  # training minutes per model, test images (None: all)


def main(argv=None):
  parser = cli.make_parser(__doc__, presets=PRESETS, default_preset="cpu")
  parser.set_defaults(data_dir=str(SHARED / "data" / "cifar10"))
  parser.add_argument("--models", default=",".join(compare.LECTURE_MODELS), help="comma-separated registered models")
  parser.add_argument("--minutes-per-model", type=float, help="training time per model (default: cpu 2, gpu 5)")
  parser.add_argument("--force", action="store_true", help="train again models that have a result.json")
  args = parser.parse_args(argv)
  try:  # a bad name or --set fails now, not after an hour
    configs = {m: cli.apply_args(compare.model_config(PRESETS[args.preset], m), args) for m in args.models.split(",")}
  except ValueError as e:
    parser.error(str(e))
  if args.print_config:
    return [cli.print_config(c) for c in configs.values()] and 0
  cli.start(args, host_devices="cores")  # multi-host JAX if asked, CPU malloc tuning
  minutes, test_images = BUDGETS[args.preset]
  minutes = None if args.steps or args.epochs else args.minutes_per_model or minutes  # a given length: no budget
  compare.compare_models(configs, args.workdir, minutes=minutes, test_images=test_images, force=args.force,
                         restart=args.restart)
  return 0


if __name__ == "__main__":
  sys.exit(cli.guarded_main(main))  # user errors: one line, exit 2; --debug for the traceback
