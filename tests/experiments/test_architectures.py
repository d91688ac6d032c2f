"""experiments/architectures.py and jcv.train.compare: the preset's input size is the smallest that
every family accepts, a run that diverges keeps its row, and the script runs end to end as a
real subprocess (a few seconds of training on a few real CIFAR-10 JPEGs) leaving its table and figure."""
import importlib.util
import json
import pathlib
import re
import subprocess
import sys

from jcv.train import compare, report
from jcv.train.loop import NonFiniteLossError

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "architectures.py"


def _load():
  spec = importlib.util.spec_from_file_location("architectures_experiment", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_preset_size_is_the_smallest_every_family_accepts():
  exp = _load()
  size = exp.PRESETS["cpu"].data.image_size
  assert size == exp.PRESETS["gpu"].data.image_size == 75
  assert all(compare.accepts(name, size) for name in compare.LECTURE_MODELS)
  assert not compare.accepts("inception_v3", size - 1) and not compare.accepts("inception_resnet_v2", size - 1)
  assert compare.smallest_common_size(("resnet18", "spp_net"), start=60) == 64  # spp_net's own check
  assert {"vgg11_bn", "vgg16_bn", "textbook_cnn", "cifar_cnn"} <= set(compare.LECTURE_MODELS)
  # The same recipe for every family; Keras-style BatchNorm momentum brought to 0.9.
  configs = {m: compare.model_config(exp.PRESETS["cpu"], m) for m in compare.LECTURE_MODELS}
  assert all(c.replace(model={"name": "x", "options": {}}) == exp.PRESETS["cpu"].replace(model={"name": "x"})
             for c in configs.values())
  assert configs["mobilenet_v2"].model.options == {"bn_momentum": 0.9} and configs["resnet50"].model.options == {}


def test_a_diverged_run_keeps_its_row(tmp_path, monkeypatch):
  def diverge(config, folder, **kwargs):
    raise NonFiniteLossError("training loss is nan at step 7; stopping (no checkpoint had been saved yet). Lower ...")
  monkeypatch.setattr(report, "fit_and_test", diverge)
  config = compare.model_config(_load().CPU, "alexnet")
  row = compare.train_one(config, tmp_path / "alexnet", extra={"params": 1})
  assert row["status"] == "diverged (training loss is nan at step 7)" and row["params"] == 1
  assert json.loads((tmp_path / "alexnet" / "result.json").read_text())["status"] == row["status"]
  rows = compare.train_all({"alexnet": config}, tmp_path)  # done: read back, not trained again
  assert rows[0]["status"] == row["status"]


def test_smoke_run_writes_the_table_and_figure(tiny_folder, script_env, tmp_path):
  data = tiny_folder("cifar10", {"train": 5, "test": 2})
  printed = subprocess.run([sys.executable, SCRIPT, "--workdir", tmp_path / "x", "--print-config"], cwd=REPO,
                           env=script_env, capture_output=True, text=True, timeout=120)
  assert printed.returncode == 0, printed.stderr[-2000:]
  names = [json.loads(block)["model"]["name"] for block in re.split(r"\n(?=\{)", printed.stdout.strip())]
  assert names == list(compare.LECTURE_MODELS)
  workdir = tmp_path / "arch"
  proc = subprocess.run([sys.executable, SCRIPT, "--data-dir", data, "--workdir", workdir, "--models", "textbook_cnn",
                         "--minutes-per-model", "0.01", "--batch-size", "8", "--set", "data.image_size=32",
                         "--set", "data.val_fraction=0.2", "--set", "run.plots=False"], cwd=REPO, env=script_env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads((workdir / "comparison.json").read_text())
  assert row["run"] == "textbook_cnn" and row["status"] == "ok" and row["params"] == 1_341_226
  assert row["steps"] >= 1 and row["test_n"] == 20 and 0 <= row["test_top1"] <= 1 and row["gflops_per_image"] > 0
  config = json.loads((workdir / "textbook_cnn" / "config.json").read_text())
  assert config["run"]["length"] == f"{row['steps']} steps"  # the measured budget
  table = (workdir / "comparison.md").read_text()
  assert "| textbook_cnn | 1,341,226 |" in table and "0.01 min of training each" in table
  assert (workdir / "comparison.png").stat().st_size > 0
