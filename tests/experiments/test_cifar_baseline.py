"""experiments/cifar10.py --preset baseline: homework 2's textbook network with Adam and flip +
shift augmentation, as printed and as a real 3-step subprocess run on a few real CIFAR-10 JPEGs."""
import json
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "cifar10.py"


def test_baseline_preset_prints_and_trains(tiny_folder, script_env, tmp_path):
  printed = subprocess.run([sys.executable, SCRIPT, "--preset", "baseline", "--workdir", tmp_path / "x",
                            "--print-config"], cwd=REPO, env=script_env, capture_output=True, text=True, timeout=120)
  assert printed.returncode == 0, printed.stderr[-2000:]
  config = json.loads(printed.stdout)
  assert config["model"]["name"] == "textbook_cnn" and config["init"]["whiten"] is None
  assert (config["optim"]["name"], config["optim"]["learning_rate"], config["optim"]["weight_decay"]) == ("adamw", 1e-3, 0)
  assert config["augment"]["ops"] == ["flip", ["shift", {"width": 0.1, "height": 0.1}]]
  data, workdir = tiny_folder("cifar10", {"train": 4, "test": 2}), tmp_path / "run"
  proc = subprocess.run([sys.executable, SCRIPT, "--preset", "baseline", "--data-dir", data, "--workdir", workdir,
                         "--steps", "3", "--batch-size", "16", "--no-progress", "--set", "run.plots=False"],
                        cwd=REPO, env=script_env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == 3 and np.isfinite(results["final"]["train"]["loss"]) and results["final"]["eval"]["n"] == 20
