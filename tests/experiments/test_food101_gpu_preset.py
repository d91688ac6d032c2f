"""The path users run on accelerators, ``experiments/food101.py --preset gpu`` (tfds ``food101``,
101 classes, bfloat16, 64 images per device), end to end on 8 simulated CPU devices from tfds'
mock data (600 records per split, so that one global batch of 512 fits): fit, the test report on the validation split, and a run folder `jcv evaluate` reads."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from script_cache import private_cache

pytest.importorskip("tensorflow_datasets")

REPO = pathlib.Path(__file__).resolve().parents[2]
DRIVER = """
import sys
import tensorflow_datasets as tfds
sys.path.insert(0, {experiments!r})
import food101
with tfds.testing.mock_data(num_examples=600, policy=tfds.testing.MockPolicy.USE_CODE):
  sys.exit(food101.main(sys.argv[1:]))
"""


@pytest.mark.timeout(900)
def test_gpu_preset_runs_on_8_devices_from_tfds_mock_data(shared_dir, tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(REPO), JCV_CACHE_DIR=private_cache(tmp_path), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  args = ["--preset", "gpu", "--weights", shared_dir / "weights" / "efficientnet_lite2.npz", "--workdir", workdir,
          "--steps", 2, "--image-size", 32, "--set", "data.num_workers=0", "--set", "run.plots=False"]
  proc = subprocess.run([sys.executable, "-c", DRIVER.format(experiments=str(REPO / "experiments")), *map(str, args)],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=840)
  assert proc.returncode == 0, proc.stderr[-4000:]
  config = json.loads((workdir / "config.json").read_text())
  # The preset as users get it: tfds food101, bfloat16, 64 images per device on 8 devices.
  assert (config["data"]["dataset"], config["model"]["dtype"], config["data"]["batch_size"]) == ("food101", "bfloat16", 512)
  assert (config["model"]["name"], config["data"]["image_size"], config["evaluation"]["image_size"]) == (
      "efficientnet_lite2", 32, 37)  # the evaluation size keeps the preset's ratio (304 / 260)
  results = json.loads((workdir / "results.json").read_text())
  assert results["split"] == "validation" and results["n"] == 600 and len(json.loads(
      (workdir / "class_names.json").read_text())) == 101
  assert 0.0 <= results["top1"] <= 1.0 and results["config"]["run"]["length"] == "2 steps"
