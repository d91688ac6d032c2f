"""The experiment scripts on the shared parser: the same flags everywhere, what --epochs and
--steps mean in the two-phase transfer runs, and food101.py / cats_vs_dogs.py as real
subprocesses for a few steps on a handful of real JPEGs."""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from jcv.train import Config, cli, transfer

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = {name: REPO / "experiments" / f"{name}.py" for name in ("cifar10", "cats_vs_dogs", "food101")}
SHARED_FLAGS = {"--workdir", "--data-dir", "--preset", "--epochs", "--steps", "--batch-size", "--seed",
                "--parallel", "--checkpoint-every", "--set", "--no-progress", "--coordinator-address",
                "--num-processes", "--process-id"}


def _load(name):
  spec = importlib.util.spec_from_file_location(f"{name}_experiment", SCRIPTS[name])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env(tmp_path):
  env = dict(os.environ, JCV_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  return env


def _shared_actions(parser):
  return {a.option_strings[0]: (a.dest, a.type, a.nargs, a.const, a.__class__)
          for a in parser._actions if a.option_strings and a.option_strings[0] in SHARED_FLAGS}


def test_every_script_has_the_shared_flags_in_its_help(tmp_path):
  reference = _shared_actions(cli.make_parser())
  assert set(reference) == SHARED_FLAGS
  for name in ("cats_vs_dogs", "food101"):  # built on the shared parser, not a copy of it
    assert _shared_actions(_load(name).make_parser()) == reference, name
  for name, script in SCRIPTS.items():
    out = subprocess.run([sys.executable, str(script), "--help"], cwd=REPO, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert SHARED_FLAGS <= set(re.findall(r"--[a-z][a-z-]*", out.stdout)), name
    assert "stop after N optimizer steps in total" in text and " min" in text, name  # what, and how long
    assert "presets:" in text or "recipes (" in text, name                           # the defaults


def test_two_phase_runs_split_epochs_and_steps():
  assert transfer.split_epochs(20, None, recipe=(20, 15)) == (15, 5)
  assert transfer.split_epochs(8, None, recipe=(20, 15)) == (6, 2)
  assert transfer.split_epochs(8, 3, recipe=(20, 15)) == (3, 5)
  with pytest.raises(ValueError, match=r"\[0, 4\]"):
    transfer.split_epochs(4, 6, recipe=(20, 15))
  assert transfer.split_steps(None, 15, examples=100, batch_size=32) == (None, None)
  assert transfer.split_steps(7, 1, examples=44, batch_size=8) == (5, 2)   # 5 steps per epoch
  assert transfer.split_steps(3, 15, examples=44, batch_size=8) == (3, 0)  # no fine-tuning left


def test_food101_flags_over_its_recipes():
  food = _load("food101")
  parse = food.make_parser().parse_args
  args = parse([])
  food.resolve_recipe(args)  # JAX sees only CPUs here
  assert (args.preset, args.mode, args.seed) == ("cpu", "fit", 0)
  assert {k: getattr(args, k) for k in food.RECIPES["cpu"]["fit"]} == food.RECIPES["cpu"]["fit"]
  args = parse(["--mode", "cached", "--epochs", "8", "--batch-size", "16"])
  food.resolve_recipe(args)
  assert (args.epochs_head, args.epochs_finetune, args.batch_size, args.learning_rate) == (6, 2, 16, 1e-3)
  args = parse(["--preset", "gpu"])
  food.resolve_recipe(args)
  import jax
  assert (args.batch_size, args.dtype, args.epochs) == (64 * jax.device_count(), "bfloat16", 20)
  for argv, message in ((["--epochs-head", "2"], "cached mode only"), (["--mode", "cached", "--set", "a=1"],
                        "fit mode only"), (["--set", "learning_rat=1"], "unknown config field")):
    args = parse(argv)
    with pytest.raises(SystemExit, match=message):
      food.resolve_recipe(args)


def test_cats_vs_dogs_flags_over_its_recipes():
  cats = _load("cats_vs_dogs")
  args = cats.make_parser().parse_args(["--epochs", "12"])
  assert (args.variant, args.batch_size, args.seed, args.preset) == ("all", 32, 0, "cpu")
  assert cats.recipe(args, "advanced_cnn")["epochs"] == 12 and cats.finetune_epochs(args) == (10, 2)
  assert cats.finetune_epochs(cats.make_parser().parse_args([])) == (20, 4)
  args = cats.make_parser().parse_args(["--steps", "3", "--set", "label_smoothing=0.1"])
  cfg = cli.apply_args(cats.base_config(args, **cats.recipe(args, "scratch")), args)
  assert (cfg.model, cfg.epochs, cfg.steps, cfg.label_smoothing, cfg.batch_size) == ("mobilenet_v2", 2, 3, 0.1, 32)
  assert isinstance(cfg, Config)


def _tiny_folder(src: pathlib.Path, dst: pathlib.Path, classes, per_split):
  """A few real JPEGs per class: dst/<split>/<class>/<file>."""
  for split, count in per_split.items():
    for c in classes:
      (dst / split / c).mkdir(parents=True)
      for f in sorted((src / split / c).iterdir())[:count]:
        shutil.copy(f, dst / split / c / f.name)
  return dst


def test_food101_smoke_run(shared_dir, tmp_path):
  data = _tiny_folder(shared_dir / "data" / "food101_mini", tmp_path / "food",
                      ("pizza", "ramen", "sushi"), {"train": 8, "test": 4})
  workdir = tmp_path / "run"
  cmd = [sys.executable, str(SCRIPTS["food101"]), "--data-dir", str(data), "--workdir", str(workdir),
         "--weights", str(shared_dir / "weights" / "mobilenet_v2_1.0_224_backbone.npz"),
         "--steps", "2", "--batch-size", "8", "--image-size", "48", "--set", "plots=False",
         "--set", "label_smoothing=0.2"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["mode"] == "fit" and results["n"] == 12 and 0 <= results["top1"] <= 1
  config = results["config"]
  assert (config["steps"], config["batch_size"], config["image_size"], config["label_smoothing"]) == (2, 8, 48, 0.2)
  assert config["epochs"] == 20 and config["freeze"] == []  # the cpu fit recipe: 20 epochs, whole network
  assert tuple(config["crop_scale"]) == (0.25, 1.0) and config["tta_flip"]
  # evaluated on the whole image at 256/224 of the training size
  assert (config["eval_image_size"], config["eval_crop_fraction"]) == (round(48 * 256 / 224), 1.0)
  for name in ("confusion.png", "predictions.png", "config.json", "class_names.json"):
    assert (workdir / name).is_file(), name


def test_cats_vs_dogs_smoke_run(shared_dir, tmp_path):
  data = _tiny_folder(shared_dir / "data" / "cats_vs_dogs", tmp_path / "cvd", ("cat", "dog"),
                      {"train": 11, "test": 4})
  workdir = tmp_path / "run"
  # finetune: the head alone for 1 epoch (2 x 10 images with their mirror images, batch 8:
  # 5 steps), then fine-tuning for the 2 steps left of --steps 7.
  cmd = [sys.executable, str(SCRIPTS["cats_vs_dogs"]), "--variant", "finetune", "--data-dir", str(data),
         "--workdir", str(workdir), "--steps", "7", "--epochs-head", "1", "--batch-size", "8",
         "--image-size", "48"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((workdir / "finetune" / "result.json").read_text())
  assert [(h["epoch"], h["step"]) for h in result["history"]] == [(1, 5), (2, 2)]
  assert result["epochs"] == 24 and result["image_size"] == 48 and 0 <= result["test_top1"] <= 1
  assert result["config"]["steps"] == 2 and result["config"]["learning_rate"] == 1e-4
  assert not (workdir / "frozen").exists()  # its head ran 1 epoch, not the frozen variant's 20
