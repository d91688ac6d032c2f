"""Food-101 (the project's main job): fine-tune an ImageNet backbone with jcv.train.fit.

  python experiments/food101.py --data-dir ../shared/data/food101_10 \\
      --weights ../shared/weights/efficientnet_lite2.npz --workdir runs/food101
  python experiments/food101.py ... --mode cached                 # the quick CPU row
  python experiments/food101.py ... --backbone mobilenet_v2 --weights ../shared/weights/mobilenet_v2_1.0_224_backbone.npz
  python experiments/food101.py ... --steps 2 --image-size 64     # smoke test, about a minute
  python experiments/food101.py ... --print-config                # the exact config, as JSON
  python experiments/food101.py --preset gpu --weights FILE       # tfds food101, 101 classes (downloads ~5 GB)

Presets (``--preset``, default ``gpu`` when JAX sees a GPU/TPU, else ``cpu``; ``--mode cached``
is the ``cached`` preset). ``--backbone``: ``efficientnet_lite2`` (default; ``--weights FILE``,
e.g. ../shared/weights/efficientnet_lite2.npz) or ``mobilenet_v2``; each brings its preprocessing.
- ``cpu``: every stage of the backbone (0.3x the head's rate, BatchNorm in inference mode),
  176 px, 7 epochs, random-resized crops (area 0.25-1), flip and colour jitter, AdamW 1e-3,
  label smoothing 0.1; evaluated on the whole image at 208 px with flip TTA.
  food101_10: test top-1 93.5 % (val 90.7 %) in 25.6 min on a quiet 2-core AMD EPYC (2026-11-30).
- ``gpu`` (unmeasured): the cpu recipe at 260 px (evaluated at 304), 10 epochs, bfloat16,
  batch 64 per device.
- ``cached``: the frozen bottom runs once over every image and its mirror image at 224 px; the
  head trains alone for 15 epochs, then with the top 3 stages for 5 at a lower rate (phases).
  food101_10: test top-1 90.6 % (val 86.3 %) in 9.1 min on the same machine.
Choices and evidence: docs/transfer.md ("food101_10").

``--weights`` (a local .npz/.h5/.pth or a jcv.weights download name) becomes ``init_from``, so
WORKDIR/config.json alone reproduces the run. After training, WORKDIR/results.json gets the
test split's top-1/top-5 and per-class accuracy, with confusion.png and predictions.png;
``python -m jcv predict --workdir WORKDIR IMAGE...`` uses the run.
"""
from __future__ import annotations

import os
import pathlib
import sys

import numpy as np

from jcv import plots, safefile
from jcv.train import Config, build, cli, evaluation, fit

REPO = pathlib.Path(__file__).resolve().parents[1]
WEIGHTS = "mobilenet_v2_1.0_224_no_top"
BACKBONES = {"mobilenet_v2": WEIGHTS, "efficientnet_lite2": None}  # backbone -> default weights (None: a file)
AUGMENT = ("flip", ("color_jitter", {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02}))
CPU = Config(
    dataset="food101", train_split="train[10%:]", eval_split="train[:10%]",
    image_size=176, crop="random_resized", crop_scale=(0.25, 1.0), augment=AUGMENT,
    eval_image_size=208, eval_crop_fraction=1.0, tta_flip=True,
    model="efficientnet_lite2", init_from={"pretrained": {"weights": None}}, mean="pretrained", std="pretrained",
    trainable="backbone", backbone_lr_multiplier=0.3,  # every stage, BatchNorm in inference mode
    optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, warmup_epochs=0.5, label_smoothing=0.1,
    epochs=7, batch_size=32, progress=False,
)
# The cpu recipe at Lite2's own 260 px (evaluated at the same 1.17x, whole image) for 10 epochs of
# the 101-class tfds food101 (68k training images per epoch): docs/transfer.md argues each choice.
GPU = CPU.replace(image_size=260, eval_image_size=304, epochs=10, warmup_epochs=1.0, dtype="bfloat16",
                  batch_size=64, num_workers=8)  # batch: 64 per device (main scales it)
CACHED = CPU.replace(
    image_size=224, augment=(), eval_image_size=None, eval_crop_fraction=0.875, tta_flip=False, warmup_epochs=0.0,
    feature_cache={"flip": True}, epochs=20,
    phases=({"epochs": 15, "trainable": "head", "learning_rate": 1e-3},
            {"epochs": 5, "trainable": 3, "learning_rate": 2e-4, "backbone_lr_multiplier": 0.3,
             "warmup_epochs": 0.5}))
PRESETS = {"cpu": CPU, "gpu": GPU, "cached": CACHED}


def make_config(args) -> Config:
  """The preset, on the data and weights given, with the shared flags and --set applied."""
  import jax
  preset = "cached" if args.mode == "cached" else args.preset or cli.backend_preset()
  model = args.backbone or PRESETS[preset].model
  weights = args.weights or BACKBONES[model]
  if weights is None:
    raise ValueError(f"{model} has no download name: pass --weights FILE (e.g. ../shared/weights/{model}.npz)")
  config = PRESETS[preset].replace(model=model, init_from={"pretrained": {"weights": weights}})
  if args.data_dir and build.is_image_folder(args.data_dir):  # an image folder: val carved from train
    config = config.replace(dataset=args.data_dir, train_split="train", eval_split="val", val_fraction=0.1)
  if args.image_size:  # the evaluation size keeps its ratio to the training size
    ratio = (config.eval_image_size or config.image_size) / config.image_size
    config = config.replace(image_size=args.image_size,
                            eval_image_size=round(args.image_size * ratio) if config.eval_image_size else None)
  if preset == "gpu" and args.batch_size is None:
    config = config.replace(batch_size=64 * jax.device_count())
  return cli.apply_args(config, args)


def report(config: Config, workdir: pathlib.Path, fit_results: dict) -> dict:
  """Test-split metrics, confusion matrix and a grid of predictions -> WORKDIR/results.json."""
  from jcv.data import pipeline, transforms
  run_config, class_names, state, mesh = evaluation.load_run(workdir, which="latest")
  test = build.build_source(run_config, "test" if build.is_image_folder(config.dataset, "test") else "validation")
  loader = pipeline.eval_loader(test, batch_size=config.batch_size, **build.eval_view(run_config))
  logits, labels, _ = evaluation.collect_logits(state, loader, run_config, mesh)
  results = {**evaluation.test_metrics(logits, labels, class_names), "val": fit_results["final"]["eval"],
             "wall_time_s": fit_results["wall_time_s"], "phases": fit_results.get("phases"),
             "config": run_config.to_dict(), "machine": f"{os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}"}
  safefile.write_json(workdir / "results.json", results, indent=1, default=float)
  predictions = logits.argmax(-1)
  plots.confusion_matrix(labels, predictions, class_names, workdir / "confusion.png")
  pick = np.random.default_rng(config.seed).permutation(len(labels))[:16]
  view = build.eval_view(run_config)
  images = [transforms.eval_resize_crop(test[int(i)]["image"], view["image_size"], crop_fraction=view["crop_fraction"])
            for i in pick]
  plots.prediction_grid(images, labels[pick], predictions[pick], class_names, workdir / "predictions.png")
  print(f"test top-1 {results['top1']:.4f}, top-5 {results['top5']:.4f} on {results['n']} images")
  for name, acc in results["per_class_top1"].items():
    print(f"  {name:>16s}: {acc:.3f}")
  return results


def main(argv=None):
  parser = cli.make_parser(__doc__, presets=PRESETS, default_workdir=str(REPO / "runs" / "food101"),
                           helps={"preset": "recipe (below; default: gpu if JAX sees a GPU/TPU, else cpu)"})
  parser.add_argument("--mode", default="auto", choices=("auto", "fit", "cached"),
                      help="cached: the cached preset (frozen features, then fine-tuning); auto = fit")
  parser.add_argument("--backbone", choices=sorted(BACKBONES),
                      help="ImageNet backbone (default: the preset's); its preprocessing comes with it")
  parser.add_argument("--weights", help="the backbone's ImageNet weights: a local .npz/.h5/.pth file or a "
                      f"jcv.weights download name (default for mobilenet_v2: {BACKBONES['mobilenet_v2']})")
  parser.add_argument("--image-size", type=int, help="training size in pixels (evaluation size scales with it)")
  args = parser.parse_args(argv)
  cli.start(args, host_devices="cores")  # multi-host JAX if asked, CPU malloc tuning
  try:
    config = make_config(args)
  except ValueError as e:
    parser.error(str(e))
  if args.print_config:
    return cli.print_config(config)
  weights = config.init_from["pretrained"]["weights"]
  if pathlib.Path(weights).is_file():  # a damaged file fails now, in one line, not after the data
    from jcv.weights.files import check_weight_file
    check_weight_file(weights)
  workdir = pathlib.Path(args.workdir)
  report(config, workdir, fit(config, workdir=workdir, restart=args.restart))
  return 0


if __name__ == "__main__":
  sys.exit(cli.guarded_main(main))  # user errors: one line, exit 2; --debug for the traceback
