"""Fault injection (issue #29): readers of a run folder (evaluate, predict, load_run) while the
run lives, on damaged checkpoints and on phase folders. Real subprocesses of run_tiny.py."""
import os
import pathlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

import subprocs
from tiny import array_sources

STEPS = 24
ARGS = ("--steps", STEPS, "--checkpoint-every", 3)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  yield subprocs.run_to_end(tmp_path_factory.mktemp("ref") / "ref", *ARGS)
  subprocs.kill_leftovers()


def _image(path):
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(path)
  return path


def test_readers_never_break_a_live_run(tmp_path):
  from jcv.train import evaluation
  run, image = tmp_path / "live", _image(tmp_path / "x.png")
  _, eval_src = array_sources(256, 40)
  proc = subprocs.launch(run, "--steps", 80, "--checkpoint-every", 1)
  subprocs.wait_for_step(proc, run, 1)
  reads, errors = 0, []
  while proc.poll() is None:
    try:
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluation.predict(run, [image], which="latest")
        evaluation.evaluate(run, source=eval_src, which="best")
      reads += 1
    except ValueError as e:
      errors.append(str(e))
  assert proc.returncode == 0, subprocs.output(proc)[-3000:]
  assert reads >= 2 and not errors, errors
  assert all("\n" not in e for e in errors)
  assert not any(p.name.endswith(".damaged") for p in run.iterdir())


def test_a_damaged_newest_checkpoint_readers_fall_back_and_resume_keeps_the_good_step(finished, tmp_path):
  from jcv.train import evaluation
  run = tmp_path / "run"
  shutil.copytree(finished, run, ignore=shutil.ignore_patterns("params_p*.npz"))
  newest = subprocs.committed_steps(run)[-1]
  shutil.rmtree(run / "checkpoints" / str(newest))
  (run / "checkpoints" / str(newest)).mkdir()  # an empty step folder
  with pytest.warns(UserWarning, match=rf"step {newest} .*could not be read.*using step {newest - 3}"):
    assert evaluation.load_run(run, which="latest")[2].step == newest - 3
  proc = subprocs.launch(run, *ARGS)
  assert subprocs.finish(proc) == 0, subprocs.output(proc)[-3000:]
  assert f"resuming from step {newest - 3}" in subprocs.output(proc)
  assert newest - 3 in subprocs.committed_steps(run) and newest in subprocs.committed_steps(run)
  assert [p.name.split("-")[0] for p in (run / "checkpoints.damaged").iterdir()] == [str(newest)]
  a, b = subprocs.load_params(finished), subprocs.load_params(run)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_truncated_files_in_the_newest_checkpoint_readers_fall_back(finished, tmp_path):
  run = tmp_path / "run"
  shutil.copytree(finished, run, ignore=shutil.ignore_patterns("params_p*.npz"))
  newest = subprocs.committed_steps(run)[-1]
  for f in (run / "checkpoints" / str(newest)).rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[:10])
  out = _jcv("predict", "--workdir", run, "--checkpoint", "latest", _image(tmp_path / "x.png"))
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and f"using step {newest - 3}" in lines[0], out.stderr[-2000:]
  proc = subprocs.launch(run, *ARGS)  # the run resumes from the newest good step
  assert subprocs.finish(proc) == 0, subprocs.output(proc)[-3000:]
  assert f"resuming from step {newest - 3}" in subprocs.output(proc)
  assert newest in subprocs.committed_steps(run) and (run / "checkpoints.damaged").is_dir()


def _jcv(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2])}
  return subprocess.run([sys.executable, "-m", "jcv", *map(str, args)], capture_output=True, text=True,
                        env=env, timeout=600)


def test_a_phase_folder_names_the_run_folder_in_one_line(finished, tmp_path):
  from jcv.train import build, evaluation
  run = tmp_path / "run"
  shutil.copytree(finished / "checkpoints", run / "checkpoints")
  config, names, state, _ = evaluation.load_run(finished, which="latest")
  # A phase trained on cached features saves the top only: its config's model is not its state's.
  top = config.replace(model={"options": {**config.model.options, "widths": (4,)}})
  evaluation.save_run(run / "phases" / "0", top, build.build_model(top, 10),
                      {"params": state.params, "batch_stats": state.batch_stats}, class_names=names)
  out = _jcv("evaluate", "--workdir", run / "phases" / "0")
  assert out.returncode == 2
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and f"use --workdir {run}" in errors[0], out.stderr[-2000:]
  assert "PyTreeDef" not in out.stderr and "tree" not in errors[0]
  assert "Traceback" not in out.stderr, out.stderr[-2000:]  # no reads started, none left to fail


def test_evaluate_caps_the_batch_and_predict_reports_an_unreadable_file(finished, tmp_path):
  from jcv.train import evaluation
  _, eval_src = array_sources(256, 80)
  assert evaluation.evaluate(finished, source=eval_src, batch_size=100000, which="latest")["n"] == 80
  good, bad = _image(tmp_path / "good.png"), tmp_path / "bad.png"
  bad.write_bytes(b"not an image")
  with pytest.warns(UserWarning, match="cannot predict .*bad.png"):
    rows = evaluation.predict(finished, [bad, good], which="latest")
  assert "error" in rows[0] and rows[0]["file"] == str(bad) and len(rows[1]["top"]) == 5
