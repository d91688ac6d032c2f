"""``jcv train``: your own photos (or a tfds dataset) to a trained run folder, in one command.

  jcv train --data-dir PHOTOS --workdir RUN --pretrained efficientnet_lite2 --weights lite2.npz
  jcv train --data-dir PHOTOS --workdir RUN --model resnet18 --minutes 5
  jcv train --tfds cats_vs_dogs --tfds-dir ~/tensorflow_datasets --workdir RUN --pretrained mobilenet_v2

PHOTOS is an image folder with splits (PHOTOS/train/<class>/..., optional val/ and test/) or
without (PHOTOS/<class>/...): a seeded 10% of train becomes the validation split when there is
no val/. ``--pretrained`` fine-tunes an ImageNet backbone with a new head (jcv.train.recipes.FINETUNE:
every stage at 0.3x the head's rate, 176 px, evaluated at 208 px with flip TTA); ``--model``
trains any registered model from scratch (recipes.SCRATCH, at the model card's input size).
Epochs: ``--epochs``, or what fits in ``--minutes`` (measured on this machine), or 7 for
fine-tuning (at least 500 steps) and 30 from scratch. The run folder is like every other
(``jcv evaluate``, ``jcv predict``); the test split, if there is one, is evaluated at the end.
"""
from __future__ import annotations

import difflib
import math
import pathlib

from jcv.train import build, cli, recipes
from jcv.train.config import Config
from jcv.train.sections import Model, Pretrained

__all__ = ["make_parser", "make_config", "main"]


def make_parser():
  """The ``jcv train`` parser: the shared flags of every experiment plus the model, data and budget."""
  p = cli.make_parser(__doc__, helps={
      "data_dir": "an image folder: DIR/train/<class>/... (optional val/, test/) or DIR/<class>/...",
      "epochs": "training epochs (default: what fits in --minutes, else the recipe's)",
      "preset": "unused: the recipe follows --pretrained (fine-tuning) or --model (from scratch)"})
  p.prog = "jcv train"
  what = p.add_mutually_exclusive_group(required=True)
  what.add_argument("--model", help="train this registered model from scratch (jcv summary MODEL describes it)")
  what.add_argument("--pretrained", metavar="MODEL", help="fine-tune this ImageNet backbone (needs --weights)")
  p.add_argument("--weights", help="--pretrained's weights: a local .npz/.h5/.pth or a jcv.weights download name")
  p.add_argument("--tfds", metavar="NAME", help="a tfds dataset by name instead of --data-dir")
  p.add_argument("--tfds-dir", metavar="DIR", help="the tfds data_dir holding --tfds (prepared; see docs/data.md)")
  p.add_argument("--minutes", type=float, help="time budget for training: epochs are chosen to fit it")
  p.add_argument("--image-size", type=int, help="training size (default: the recipe's or the model card's)")
  return p


def _model_config(args) -> Config:
  import jcv.models
  import jcv.weights
  name = args.pretrained or args.model
  known = jcv.models.list_models()
  if name not in known:
    close = difflib.get_close_matches(name, known, n=3)
    raise ValueError(f"unknown model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                     + " (jcv.models.list_models() lists them)")
  if args.model:
    size = args.image_size or jcv.models.get_card(name).input_size
    return recipes.SCRATCH.replace(model=Model(name=name), data={"image_size": size})
  jcv.weights.pretrained_info(name)  # a model without ported weights: one line naming those that have them
  if not args.weights:
    raise ValueError(f"--pretrained {name} needs --weights FILE (or a jcv.weights download name)")
  config = recipes.FINETUNE.replace(model=Model(name=name), init={"pretrained": Pretrained(args.weights)})
  if args.image_size:  # the evaluation size keeps its ratio to the training size
    ratio = config.evaluation.image_size / config.data.image_size
    config = config.replace(data={"image_size": args.image_size},
                            evaluation={"image_size": round(args.image_size * ratio)})
  return config


def _data_config(config: Config, args) -> tuple[Config, str | None]:
  """``config`` on the data given -> (config, its test split or None)."""
  if args.tfds:
    return _tfds_config(config, args)
  if not args.data_dir:
    raise ValueError("name the data: --data-dir DIR (an image folder) or --tfds NAME")
  root = pathlib.Path(args.data_dir).expanduser()
  if not root.is_dir():
    raise ValueError(f"--data-dir {str(root)!r} does not exist or is not a directory")
  has_val = build.is_image_folder(root, "val")
  config = config.replace(data={"dataset": str(root), "data_dir": None, "train_split": "train", "eval_split": "val",
                                "val_fraction": None if has_val else 0.1})
  test = "test" if build.is_image_folder(root, "test") and build.is_image_folder(root, "train") else None
  return config, test


def _tfds_config(config: Config, args) -> tuple[Config, str | None]:
  import tensorflow_datasets as tfds
  try:
    splits = set(tfds.builder(args.tfds, data_dir=args.tfds_dir).info.splits)
  except Exception as e:  # noqa: BLE001 - tfds raises many kinds for a missing dataset
    raise ValueError(f"tfds dataset {args.tfds!r} is not prepared in {args.tfds_dir or 'the default data_dir'} "
                     f"({type(e).__name__}); prepare it first (docs/data.md)") from None
  evals = next((s for s in ("validation", "val") if s in splits), None)
  data = {"dataset": args.tfds, "data_dir": args.tfds_dir, "train_split": "train" if evals else "train[10%:]",
          "eval_split": evals or "train[:10%]"}
  return config.replace(data=data), "test" if "test" in splits else None


def _length(config: Config, args, train_src) -> Config:
  """``run.length`` from --epochs, --minutes (measured), or the recipe (fine-tuning: >= 500 steps)."""
  if args.epochs:
    return config.with_length(f"{args.epochs} epochs")
  steps_per_epoch = max(len(train_src) // config.data.batch_size, 1)
  if args.minutes:
    from jcv.train import budget
    steps = budget.steps_within(config, train_src, minutes=args.minutes)
    return config.replace(run={"length": f"{max(steps, 1)} steps"})
  if config.init.pretrained is not None:
    epochs = min(max(7, math.ceil(500 / steps_per_epoch)), 30)
    return config.with_length(f"{epochs} epochs")
  return config


def make_config(args) -> tuple[Config, str | None]:
  """The config ``jcv train`` runs for ``args``, and the test split to report (or None)."""
  config, test = _data_config(_model_config(args), args)
  config = cli.apply_args(config, args)  # --batch-size, --seed, --set ... before the length is chosen
  train_src = build.build_source(config, config.data.train_split)  # bad folders fail here, in one line
  if test is not None:
    build.build_source(config, test)  # class folders that differ between train and test fail now
  return _length(config, args, train_src).validate(), test


def main(argv=None) -> int:
  """Entry point of ``jcv train``."""
  parser = make_parser()
  args = parser.parse_args(argv)
  cli.start(args, host_devices="cores")
  with cli.user_errors(debug=args.debug):
    config, test = make_config(args)
    if args.print_config:
      cli.print_config(config)
      return 0
    from jcv.train import report
    from jcv.train.trainer import fit
    results = fit(config, workdir=args.workdir, restart=args.restart)
    val = (results["final"]["eval"] or {}).get("top1", float("nan"))
    summary = f"trained {results['steps']} steps in {results['wall_time_s'] / 60:.1f} min: val top-1 {val:.4f}"
    if test is not None:
      tested = report.test_report(args.workdir, split=test, fit_results=results)
      summary += f", test top-1 {tested['top1']:.4f} ({tested['n']} images)"
    print(summary + f" -> {args.workdir}")
  return 0
