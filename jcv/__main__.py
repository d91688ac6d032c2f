"""``python -m jcv evaluate|predict``: use a training run's checkpoint.

  python -m jcv evaluate --workdir RUN [--data-dir DIR] [--split test] [--checkpoint best|latest]
      prints one JSON line {"top1", "top5", "loss", "n"}
  python -m jcv predict --workdir RUN IMAGE [IMAGE ...] [--top-k 5]
      prints one JSON line per image: {"file", "top": [[class, probability], ...]}
  python -m jcv summary MODEL [--input-size N]
      prints the model card and a per-layer table (output shape, params, MACs)
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "predict"]


def predict(workdir, files, *, top_k: int = 5, which: str = "best") -> list[dict]:
  """Top-k (class name, probability) for each image file; see jcv.train.evaluation.predict."""
  from jcv.train import evaluation
  return evaluation.predict(workdir, files, top_k=top_k, which=which)


def main(argv=None):
  """Entry point of ``python -m jcv`` and the ``jcv`` console script."""
  p = argparse.ArgumentParser(prog="jcv", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  ev = sub.add_parser("evaluate", help="evaluate a run's checkpoint on a split")
  ev.add_argument("--workdir", required=True)
  ev.add_argument("--data-dir", help="image folder or tfds data_dir (default: the run's)")
  ev.add_argument("--split", default="test")
  ev.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  ev.add_argument("--batch-size", type=int)
  pr = sub.add_parser("predict", help="top-k classes of image files")
  pr.add_argument("--workdir", required=True)
  pr.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  pr.add_argument("--top-k", type=int, default=5)
  pr.add_argument("images", nargs="+")
  sm = sub.add_parser("summary", help="model card and per-layer table of a registered model")
  sm.add_argument("model")
  sm.add_argument("--input-size", type=int, help="square input size (default: the card's)")
  args = p.parse_args(argv)
  try:
    if args.command == "evaluate":
      from jcv.train import evaluation
      print(json.dumps(evaluation.evaluate(args.workdir, data_dir=args.data_dir, split=args.split,
                                     which=args.checkpoint, batch_size=args.batch_size)))
    elif args.command == "summary":
      from jcv import models
      models.summary(args.model, input_size=args.input_size)
    else:
      for row in predict(args.workdir, args.images, top_k=args.top_k, which=args.checkpoint):
        print(json.dumps(row))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
