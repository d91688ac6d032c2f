"""``jcv train|evaluate|predict|summary`` (also ``python -m jcv ...``): train, then use the run.

  jcv train --data-dir PHOTOS --workdir RUN (--pretrained MODEL --weights FILE | --model NAME) [--minutes M]
      trains on an image folder (or --tfds NAME) into a run folder; jcv train --help for the rest

  python -m jcv evaluate --workdir RUN [--data-dir DIR] [--split test] [--checkpoint best|latest]
      prints one JSON line {"top1", "top5", "loss", "n"}
  python -m jcv predict --workdir RUN IMAGE [IMAGE ...] [--top-k 5] [--plot FILE.png]
      prints one JSON line per image: {"file", "top": [[class, probability], ...]}; --plot also
      draws each image with its top-k bars into FILE.png
  python -m jcv predict --pretrained MODEL --weights FILE [--head FILE] [--labels FILE] IMAGE ...
      the same with pretrained ImageNet weights (no run folder): the file's own classifier,
      the weights' preprocessing and image size (jcv.weights.pretrained_info)
  python -m jcv summary MODEL [--input-size N]
      prints the model card and a per-layer table (output shape, params, MACs)
"""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main", "plot_predictions", "predict", "predict_pretrained"]


def predict(workdir, files, *, top_k: int = 5, which: str = "best") -> list[dict]:
  """Top-k (class name, probability) for each image file; see jcv.train.evaluation.predict."""
  from jcv.train import evaluation
  return evaluation.predict(workdir, files, top_k=top_k, which=which)


def predict_pretrained(name: str, weights, files, *, head=None, labels=None,
                       top_k: int = 5) -> list[dict]:
  """Top-k (class name, probability) of image files from pretrained weights with their classifier.

  The view is ``eval_resize_crop`` at the weights' image size and crop fraction, normalised as
  the weights expect (:func:`jcv.weights.pretrained_info`). ``labels``: a file with one class
  name per line; a 1001-line ImageNet file whose first line is ``background`` also names a
  1000-class classifier (line ``i + 1`` is class ``i``).
  """
  import jax
  import numpy as np

  import jcv.weights as W
  from jcv.data import decode, transforms
  decode.require_files(files)
  info = W.pretrained_info(name)
  classes = (W.load_head(head)["kernel"].shape[-1] if head is not None
             else W.classifier_classes(name, weights))
  if not classes:
    raise ValueError(f"{weights} holds no classifier; pass --head FILE (e.g. "
                     "mobilenet_v2_1.0_224_head_1001.npz)")
  model, variables = W.pretrained(name, weights, num_classes=classes, head=head)
  names = W.imagenet_labels(labels) if labels is not None else None
  if names is not None and len(names) == classes + 1 and names[0] == "background":
    names = names[1:]
  if names is not None and len(names) != classes:
    raise ValueError(f"label file {labels} has {len(names)} names for {classes} classes")
  images = np.stack([transforms.eval_resize_crop(decode.decode_image(f), info.input_size,
                                                 crop_fraction=info.crop_fraction) for f in files])
  probs = np.asarray(jax.nn.softmax(jax.jit(model.apply)(variables, info.normalize(images)), axis=-1))
  out = []
  for f, p in zip(files, probs):
    top = np.argsort(-p)[:top_k]
    out.append({"file": str(f), "top": [[names[i] if names else int(i), float(p[i])] for i in top]})
  return out


def plot_predictions(rows: list[dict], path) -> None:
  """Draws ``predict``'s rows (each image with its top-k bars) into the PNG ``path``."""
  import os

  from jcv import plots
  from jcv.data import decode
  images = [decode.decode_image(r["file"]) for r in rows]
  plots.prediction_bars(images, [r["top"] for r in rows], path, titles=[os.path.basename(r["file"]) for r in rows])


def _predict_command(args) -> None:
  if args.pretrained:
    if not args.weights:
      raise ValueError("--pretrained needs --weights FILE")
    rows = predict_pretrained(args.pretrained, args.weights, args.images, head=args.head,
                              labels=args.labels, top_k=args.top_k)
  else:
    rows = predict(args.workdir, args.images, top_k=args.top_k, which=args.checkpoint)
  for row in rows:
    print(json.dumps(row))
  if args.plot:
    plot_predictions(rows, args.plot)
    print(f"wrote {args.plot}", file=sys.stderr)


def main(argv=None):
  """Entry point of ``python -m jcv`` and the ``jcv`` console script."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:
    from jcv.train import command
    return command.main(argv[1:])
  p = argparse.ArgumentParser(prog="jcv", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  sub.add_parser("train", help="train on an image folder or a tfds dataset (jcv train --help)", add_help=False)
  ev = sub.add_parser("evaluate", help="evaluate a run's checkpoint on a split")
  ev.add_argument("--workdir", required=True)
  ev.add_argument("--data-dir", help="image folder or tfds data_dir (default: the run's)")
  ev.add_argument("--split", default="test")
  ev.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  ev.add_argument("--batch-size", type=int)
  pr = sub.add_parser("predict", help="top-k classes of image files")
  source = pr.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a training run's folder")
  source.add_argument("--pretrained", metavar="MODEL", help="a model with pretrained weights, "
                      "e.g. efficientnet_lite2 (needs --weights)")
  pr.add_argument("--weights", help="weight file for --pretrained")
  pr.add_argument("--head", help="separate classifier file for --pretrained (MobileNetV2's int8 head)")
  pr.add_argument("--labels", help="class names, one per line, for --pretrained")
  pr.add_argument("--checkpoint", choices=("best", "latest"), default="best")
  pr.add_argument("--top-k", type=int, default=5)
  pr.add_argument("--plot", metavar="FILE.png", help="also draw each image with its top-k bars into FILE.png")
  pr.add_argument("images", nargs="+")
  sm = sub.add_parser("summary", help="model card and per-layer table of a registered model")
  sm.add_argument("model")
  sm.add_argument("--input-size", type=int, help="square input size (default: the card's)")
  for sp in (ev, pr, sm):
    sp.add_argument("--debug", action="store_true", help="show the full traceback of an error")
  args = p.parse_args(argv)
  from jcv.train.cli import user_errors
  try:  # user errors: one "error: ..." line and exit status 2 (SystemExit from user_errors)
    with user_errors(debug=args.debug):
      if args.command == "evaluate":
        from jcv.train import evaluation
        print(json.dumps(evaluation.evaluate(args.workdir, data_dir=args.data_dir, split=args.split,
                                             which=args.checkpoint, batch_size=args.batch_size)))
      elif args.command == "summary":
        from jcv import models
        models.summary(args.model, input_size=args.input_size)
      else:
        _predict_command(args)
  except SystemExit as e:
    return e.code
  return 0


if __name__ == "__main__":
  sys.exit(main())
