"""experiments/image_ops.py runs as a real subprocess and writes readable outputs."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "image_ops.py"


def test_image_ops_script_writes_outputs(tmp_path, photo_u8):
  source = tmp_path / "photo.png"
  Image.fromarray(photo_u8).save(source)
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, str(SCRIPT), "--image", str(source), "--ops", "clahe,canny,lab_l",
       "--size", "48", "--out", str(out)],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
  assert result.returncode == 0, result.stderr[-2000:]
  for name in ("original", "clahe", "canny", "lab_l", "figure"):
    assert (out / f"{name}.png").stat().st_size > 0, name
  edges = np.asarray(Image.open(out / "canny.png"))
  assert edges.shape == (36, 48) and set(np.unique(edges)) <= {0, 255}
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["operations"]) == {"clahe", "canny", "lab_l"}
  assert max(summary["round_trip_max_abs_error"].values()) < 1e-5


def test_image_ops_script_help_and_bad_op(capsys):
  spec = importlib.util.spec_from_file_location("image_ops_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)  # in-process: no second JAX start-up
  with pytest.raises(SystemExit) as exit_info:
    module.main(["--help"])
  assert exit_info.value.code == 0
  help_text = capsys.readouterr().out
  assert "--ops" in help_text and "gaussian_blur" in help_text
  with pytest.raises(SystemExit) as exit_info:
    module.main(["--ops", "nope"])
  assert exit_info.value.code != 0 and "unknown operation" in capsys.readouterr().err
