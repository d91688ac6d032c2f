"""The experiment scripts: shared flags, recipes as Config presets (--print-config shows the
exact config), and food101.py / cats_vs_dogs.py as real subprocesses for a few steps on a
handful of real JPEGs, leaving run folders that ``python -m jcv evaluate|predict`` accept."""
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

from jcv.train import Pretrained, cli
from script_cache import private_cache

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = {name: REPO / "experiments" / f"{name}.py" for name in ("cifar10", "cats_vs_dogs", "food101", "architectures")}
SHARED_FLAGS = {"--workdir", "--data-dir", "--preset", "--epochs", "--steps", "--batch-size", "--seed",
                "--parallel", "--checkpoint-every", "--set", "--no-progress", "--print-config",
                "--coordinator-address", "--num-processes", "--process-id"}


def _load(name):
  spec = importlib.util.spec_from_file_location(f"{name}_experiment", SCRIPTS[name])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _env(tmp_path):
  env = dict(os.environ, JCV_CACHE_DIR=private_cache(tmp_path), PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # as a user runs it
  return env


def _run(args, tmp_path, timeout=300):
  return subprocess.run([sys.executable] + [str(a) for a in args], cwd=REPO, env=_env(tmp_path),
                        capture_output=True, text=True, timeout=timeout)


def _printed(script, args, tmp_path) -> list[dict]:
  proc = _run([SCRIPTS[script], *args, "--print-config"], tmp_path, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return [json.loads(block) for block in re.split(r"\n(?=\{)", proc.stdout.strip())]


def test_every_script_has_the_shared_flags_in_its_help(tmp_path):
  assert {a.option_strings[0] for a in cli.make_parser()._actions if a.option_strings} >= SHARED_FLAGS
  for name, script in SCRIPTS.items():
    out = _run([script, "--help"], tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert SHARED_FLAGS <= set(re.findall(r"--[a-z][a-z-]*", out.stdout)), name
    assert "train N optimizer steps in total" in text and " min" in text, name  # what, and how long
    assert "presets:" in text, name                                                  # the defaults


def test_epochs_flag_scales_the_phases():
  cats, food = _load("cats_vs_dogs"), _load("food101")
  assert [p.length for p in cats.FINETUNE.with_length("12 epochs").run.phases] == ["10 epochs", "2 epochs"]
  assert [p.length for p in cats.FINETUNE.run.phases] == ["20 epochs", "4 epochs"]
  assert [p.length for p in food.CACHED.with_length("8 epochs").run.phases] == ["6 epochs", "2 epochs"]
  assert [p.length for p in food.CACHED.with_length("2 epochs").run.phases] == ["2 epochs"]  # no fine-tuning left
  for preset in (*cats.PRESETS.values(), *food.PRESETS.values()):
    if preset.init.pretrained is not None and not preset.init.pretrained.weights:  # food101: --weights FILE
      preset = preset.replace(init={"pretrained": Pretrained(weights="w.npz")})
    preset.validate()


def test_print_config_shows_what_a_command_runs(tmp_path):
  (cpu,) = _printed("food101", ["--weights", "w.npz"], tmp_path)
  assert cpu["format"] == 2 and cpu["init"]["pretrained"] == {"weights": "w.npz", "head": None}
  assert cpu["init"]["whiten"] is None and cpu["model"]["name"] == "efficientnet_lite2"
  assert (cpu["init"]["trainable"], cpu["data"]["image_size"], cpu["evaluation"]["image_size"]) == ("backbone", 176, 208)
  (mnv2,) = _printed("food101", ["--backbone", "mobilenet_v2"], tmp_path)  # its download name by default
  assert mnv2["init"]["pretrained"] == {"weights": "mobilenet_v2_1.0_224_no_top", "head": None}
  no_file = _run([SCRIPTS["food101"], "--print-config"], tmp_path, timeout=120)
  assert no_file.returncode == 2 and "efficientnet_lite2 has no download name: pass --weights FILE" in no_file.stderr
  (cached,) = _printed("food101", ["--mode", "cached", "--weights", "w.npz", "--epochs", "8", "--batch-size", "16"], tmp_path)
  assert [p["length"] for p in cached["run"]["phases"]] == ["6 epochs", "2 epochs"] and cached["data"]["batch_size"] == 16
  assert cached["init"]["feature_cache"] == {"flip": True, "crop_views": 0, "stage": None, "directory": None}
  assert cached["run"]["phases"][0]["trainable"] == "head"
  ft, scratch = _printed("cats_vs_dogs", ["--variant", "finetune", "--epochs", "12"], tmp_path) + \
      _printed("cats_vs_dogs", ["--variant", "scratch", "--steps", "3", "--set", "augment.label_smoothing=0.1"], tmp_path)
  assert [p["length"] for p in ft["run"]["phases"]] == ["10 epochs", "2 epochs"] and ft["data"]["val_fraction"] == 0.1
  assert (scratch["model"]["name"], scratch["run"]["length"], scratch["augment"]["label_smoothing"]) == (
      "mobilenet_v2", "3 steps", 0.1)
  bad = _run([SCRIPTS["food101"], "--weights", "w.npz", "--set", "optim.learning_rat=1", "--print-config"], tmp_path,
             timeout=120)
  assert bad.returncode == 2 and "unknown field 'learning_rat' (did you mean 'learning_rate'?)" in bad.stderr


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
  proc = _run([SCRIPTS["food101"], "--data-dir", data, "--workdir", workdir, "--backbone", "mobilenet_v2",
               "--weights", shared_dir / "weights" / "mobilenet_v2_1.0_224_backbone.npz",
               "--steps", "2", "--batch-size", "8", "--image-size", "48", "--set", "run.plots=False",
               "--set", "augment.label_smoothing=0.2"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["n"] == 12 and 0 <= results["top1"] <= 1 and set(results["per_class_top1"]) == {"pizza", "ramen", "sushi"}
  config = results["config"]
  data, run, evaluation = config["data"], config["run"], config["evaluation"]
  assert (run["length"], data["batch_size"], data["image_size"], config["augment"]["label_smoothing"]) == (
      "2 steps", 8, 48, 0.2)
  assert config["init"]["trainable"] == "backbone" and config["model"]["name"] == "mobilenet_v2"  # the cpu recipe, every stage
  assert tuple(data["crop_scale"]) == (0.25, 1.0) and evaluation["tta_flip"]
  assert config["init"]["pretrained"]["weights"].endswith("mobilenet_v2_1.0_224_backbone.npz")
  # evaluated on the whole image at 208/176 of the training size
  assert (evaluation["image_size"], evaluation["crop_fraction"]) == (round(48 * 208 / 176), 1.0)
  for name in ("confusion.png", "predictions.png", "config.json", "class_names.json"):
    assert (workdir / name).is_file(), name


def test_cats_vs_dogs_finetune_run_folder_is_usable(shared_dir, tmp_path):
  data = _tiny_folder(shared_dir / "data" / "cats_vs_dogs", tmp_path / "cvd", ("cat", "dog"),
                      {"train": 11, "test": 4})
  workdir = tmp_path / "run"
  # The head alone for 1 epoch (2 x 10 images with their mirror images, batch 8: 5 steps),
  # then fine-tuning the top 3 stages for the 2 steps left of --steps 7.
  phases = ('run.phases=({"length": "1 epochs", "trainable": "head"}, {"length": "1 epochs", "trainable": 3, '
            '"learning_rate": 1e-4, "backbone_lr_multiplier": 0.3})')
  proc = _run([SCRIPTS["cats_vs_dogs"], "--variant", "finetune", "--data-dir", data, "--workdir", workdir,
               "--steps", "7", "--batch-size", "8", "--image-size", "48", "--set", phases], tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = workdir / "finetune"
  result = json.loads((run / "result.json").read_text())
  assert result["image_size"] == 48 and 0 <= result["test_top1"] <= 1
  phases = json.loads((run / "results.json").read_text())["phases"]
  assert [(p["trainable"], p["steps"], p["cached_features"]) for p in phases] == [("head", 5, True), (3, 2, True)]
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [(r["phase"], r["step"]) for r in records if r["split"] == "eval"] == [(0, 5), (1, 7)]
  assert not (workdir / "frozen").exists()
  # The run folder is a run like any other: evaluate and predict use it.
  out = _run(["-m", "jcv", "evaluate", "--workdir", run, "--data-dir", data], tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert abs(json.loads(out.stdout)["top1"] - result["test_top1"]) < 1e-6
  image = next((data / "test" / "dog").iterdir())
  out = _run(["-m", "jcv", "predict", "--workdir", run, image, "--top-k", "2"], tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert {c for c, _ in json.loads(out.stdout)["top"]} == {"cat", "dog"}
