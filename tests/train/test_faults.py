"""Fault injection (issue #16): kill -9 anywhere, two runs on one workdir, damaged or foreign
checkpoints, config changes on resume. Real subprocesses of run_tiny.py (8x8 images, a tiny CNN).

Bad image files, NaN logits and bad weight files are in tests/test_faults_files.py.
"""
import json
import random
import shutil
import signal
import time

import numpy as np
import pytest

import subprocs

STEPS = 24
ARGS = ("--steps", STEPS, "--checkpoint-every", 3)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """An uninterrupted reference run (also the source of damaged copies)."""
  yield subprocs.run_to_end(tmp_path_factory.mktemp("ref") / "ref", *ARGS)
  subprocs.kill_leftovers()


def _copy(run, dest):
  shutil.copytree(run, dest, ignore=shutil.ignore_patterns("params_p*.npz"))
  return dest


def _assert_bitwise_equal(a_dir, b_dir):
  a, b = subprocs.load_params(a_dir), subprocs.load_params(b_dir)
  assert int(a.pop("step")) == int(b.pop("step")) == STEPS
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_kill_9_at_random_points_and_during_a_save_then_resume_is_bitwise_equal(finished, tmp_path):
  run = tmp_path / "run"
  # 1) SIGKILL from inside, while the asynchronous write of step 6 is in progress.
  proc = subprocs.launch(run, *ARGS, env={"JCV_TEST_KILL_IN_SAVE": "6"})
  assert subprocs.finish(proc) == -signal.SIGKILL, subprocs.output(proc)[-2000:]
  assert 6 not in subprocs.committed_steps(run)  # killed before the step's commit
  assert subprocs.committed_steps(run)[-1] == 3
  # 2) SIGKILL from outside at random moments (seeded), each after some progress.
  rng = random.Random(16)
  for _ in range(2):
    before = (subprocs.committed_steps(run) or [0])[-1]
    proc = subprocs.launch(run, *ARGS)
    subprocs.wait_for_step(proc, run, before + 3)
    time.sleep(rng.uniform(0.0, 0.5))
    proc.kill()
    proc.wait()
  # 3) Resume to the end: the same parameters, bit for bit, and a word that it resumed.
  proc = subprocs.launch(run, *ARGS)
  assert subprocs.finish(proc) == 0, subprocs.output(proc)[-3000:]
  assert "resuming from step" in subprocs.output(proc)
  assert json.loads((run / "results.json").read_text())["resumed_from_step"]
  _assert_bitwise_equal(finished, run)


def test_second_run_on_a_workdir_fails_at_once_naming_the_holder(tmp_path):
  first = subprocs.launch(tmp_path / "w", "--steps", 5000, "--set", "run.seed=1")
  lock = tmp_path / "w" / ".lock"
  end = time.monotonic() + 300
  while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < end:
    time.sleep(0.05)
  second = subprocs.launch(tmp_path / "w", "--steps", 5000, "--set", "run.seed=2")
  assert subprocs.finish(second) == 2
  out = subprocs.output(second)
  assert "in use by another run" in out and f"pid {first.pid}" in out, out[-2000:]
  subprocs.wait_for_step(first, tmp_path / "w", 16)  # past start-up: SIGTERM saves and exits
  first.send_signal(signal.SIGTERM)
  assert subprocs.finish(first) == 128 + signal.SIGTERM, subprocs.output(first)[-2000:]
  assert json.loads((tmp_path / "w" / "config.json").read_text())["run"]["seed"] == 1
  assert not lock.read_text().strip()  # released on the way out


def test_every_checkpoint_truncated_refuses_to_start_over(finished, tmp_path):
  run = _copy(finished, tmp_path / "run")
  for f in (run / "checkpoints").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "state" in f.parts:
      f.write_bytes(f.read_bytes()[:10])
  before = sorted(p.name for p in (run / "checkpoints").iterdir())
  proc = subprocs.launch(run, *ARGS)
  assert subprocs.finish(proc) == 2
  out = subprocs.output(proc)
  assert "none restores" in out and "--restart" in out and "Traceback" not in out, out[-2000:]
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing deleted


def test_structural_change_on_resume_refuses_and_restart_moves_the_run_aside(finished, tmp_path):
  run = _copy(finished, tmp_path / "run")
  proc = subprocs.launch(run, "--steps", STEPS + 6, "--checkpoint-every", 3,
                         "--set", "model.options={'widths': (16,), 'convs_per_stage': 1, 'hidden': 16}")
  assert subprocs.finish(proc) == 2
  out = subprocs.output(proc)
  assert "schedule length 24 -> 30" in out and "model.options" in out and "another --workdir" in out, out[-2000:]
  # A safe change (logging, evaluation) only warns, and the finished run is left as it was.
  proc = subprocs.launch(run, *ARGS, "--set", "run.log_every=7 steps", "--set", "evaluation.every=2 epochs")
  assert subprocs.finish(proc) == 0, subprocs.output(proc)[-2000:]
  assert "run.log_every '5 steps' -> '7 steps'" in subprocs.output(proc)
  # --restart: the old run moves to run.old-<time>, intact; the new one starts at step 0.
  proc = subprocs.launch(run, "--steps", 6, "--restart")
  assert subprocs.finish(proc) == 0, subprocs.output(proc)[-2000:]
  aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
  assert len(aside) == 1 and subprocs.committed_steps(aside[0])[-1] == STEPS
  assert subprocs.committed_steps(run)[-1] == 6


def test_evaluate_refuses_data_whose_classes_the_run_does_not_know(finished):
  from jcv.data.sources import ArraySource
  from jcv.train import evaluation
  images = np.zeros((4, 8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match=r"\['zebra'\] are not among the run's 10 classes"):
    evaluation.evaluate(finished, source=ArraySource(images, [0, 1, 0, 1], class_names=["class3", "zebra"]))
  subset = ArraySource(images, [0, 1, 0, 1], class_names=["class3", "class1"])  # mapped by name
  assert evaluation.evaluate(finished, source=subset)["n"] == 4
