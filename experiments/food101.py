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
  label smoothing 0.1; evaluated on the whole image at 208 px with flip TTA (jcv.train.recipes.FINETUNE);
  bfloat16 compute on CPUs with AVX512_BF16 or AMX, else float32 (``model.dtype="auto"``).
- ``gpu``: the cpu recipe at 260 px (evaluated at 304), 10 epochs, bfloat16,
  batch 64 per device.
- ``cached``: the frozen bottom runs once over every image and its mirror image at 224 px; the
  head trains alone for 15 epochs, then with the top 3 stages for 5 at a lower rate (phases).
Measured accuracy and time: README.md; choices and evidence: docs/transfer.md ("food101_10").

``--weights`` (a local .npz/.h5/.pth or a jcv.weights download name) becomes ``init.pretrained``, so
WORKDIR/config.json alone reproduces the run. After training, WORKDIR/results.json gets the
test split's top-1/top-5 and per-class accuracy, with confusion.png and predictions.png;
``python -m jcv predict --workdir WORKDIR IMAGE...`` uses the run.
"""
from __future__ import annotations

import pathlib
import sys

from jcv.train import Config, Evaluation, FeatureCache, Model, Phase, Pretrained, Schedule, build, cli, fit, recipes, report

REPO = pathlib.Path(__file__).resolve().parents[1]
WEIGHTS = "mobilenet_v2_1.0_224_no_top"
BACKBONES = {"mobilenet_v2": WEIGHTS, "efficientnet_lite2": None}  # backbone -> default weights (None: a file)
CPU = recipes.FINETUNE.replace(  # docs/transfer.md ("food101_10") gives the evidence for each choice
    data={"dataset": "food101", "train_split": "train[10%:]", "eval_split": "train[:10%]"},
    model=Model(name="efficientnet_lite2", dtype="auto"), run={"progress": False})  # auto: bfloat16 on AVX512_BF16/AMX
# The cpu recipe at Lite2's own 260 px (evaluated at the same 1.17x, whole image) for 10 epochs of
# the 101-class tfds food101 (68k training images per epoch): docs/transfer.md argues each choice.
GPU = CPU.replace(data={"image_size": 260, "batch_size": 64, "num_workers": 8},  # batch: 64 per device (main scales it)
                  evaluation={"image_size": 304}, run={"length": "10 epochs"}, schedule={"warmup": "1 epochs"},
                  model={"dtype": "bfloat16"})
CACHED = CPU.replace(
    data={"image_size": 224}, augment={"ops": ()}, evaluation=Evaluation(), schedule=Schedule(),
    init={"feature_cache": FeatureCache(flip=True)},
    run={"length": "20 epochs", "phases": (
        Phase(length="15 epochs", trainable="head", learning_rate=1e-3),
        Phase(length="5 epochs", trainable=3, learning_rate=2e-4, backbone_lr_multiplier=0.3, warmup="0.5 epochs"))})
PRESETS = {"cpu": CPU, "gpu": GPU, "cached": CACHED}


def make_config(args) -> Config:
  """The preset, on the data and weights given, with the shared flags and --set applied."""
  import jax
  preset = "cached" if args.mode == "cached" else args.preset or cli.backend_preset()
  model = args.backbone or PRESETS[preset].model.name
  weights = args.weights or BACKBONES[model]
  if weights is None:
    raise ValueError(f"{model} has no download name: pass --weights FILE (e.g. ../shared/weights/{model}.npz)")
  config = PRESETS[preset].replace(model={"name": model}, init={"pretrained": Pretrained(weights=weights)})
  if args.data_dir and build.is_image_folder(args.data_dir):  # an image folder: val carved from train
    config = config.replace(data={"dataset": args.data_dir, "train_split": "train", "eval_split": "val",
                                  "val_fraction": 0.1})
  if args.image_size:  # the evaluation size keeps its ratio to the training size
    size, eval_size = config.data.image_size, config.evaluation.image_size
    config = config.replace(data={"image_size": args.image_size},
                            evaluation={"image_size": round(args.image_size * eval_size / size) if eval_size else None})
  if preset == "gpu" and args.batch_size is None:
    config = config.replace(data={"batch_size": 64 * jax.device_count()})
  return cli.apply_args(config, args)


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
  weights = config.init.pretrained.weights
  if pathlib.Path(weights).is_file():  # a damaged file fails now, in one line, not after the data
    from jcv.weights.files import check_weight_file
    check_weight_file(weights)
  workdir = pathlib.Path(args.workdir)
  report.test_report(workdir, fit_results=fit(config, workdir=workdir, restart=args.restart))
  return 0


if __name__ == "__main__":
  sys.exit(cli.guarded_main(main))  # user errors: one line, exit 2; --debug for the traceback
