"""Exact resume with real subprocesses: SIGTERM saves and exits; SIGKILL mid-run loses nothing
that the next run cannot redo; the final parameters are bitwise equal to an uninterrupted run."""
import json
import signal

import numpy as np

import subprocs

ARGS = ("--steps", 40, "--checkpoint-every", 4)


def test_sigterm_then_sigkill_then_resume_is_bitwise_equal(tmp_path):
  cache = ("--set", f"run.compilation_cache={tmp_path / 'jax_cache'}")
  ref = subprocs.launch(tmp_path / "ref", *ARGS, *cache)
  run = subprocs.launch(tmp_path / "run", *ARGS, *cache)

  # 1) SIGTERM: the run saves a checkpoint at the step it reached and exits with 128 + 15.
  subprocs.wait_for_step(run, tmp_path / "run", 4)
  run.send_signal(signal.SIGTERM)
  assert subprocs.finish(run) == 128 + signal.SIGTERM, subprocs.output(run)[-2000:]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["stopped_by"] == "SIGTERM"
  stopped_at = results["steps"]
  assert subprocs.committed_steps(tmp_path / "run")[-1] == stopped_at

  # 2) Resume, then SIGKILL without warning a few checkpoints later (possibly mid-save).
  run = subprocs.launch(tmp_path / "run", *ARGS, *cache)
  subprocs.wait_for_step(run, tmp_path / "run", stopped_at + 8)
  run.kill()
  run.wait()

  # 3) Resume to the end.
  run = subprocs.launch(tmp_path / "run", *ARGS, *cache)
  assert subprocs.finish(run) == 0, subprocs.output(run)[-3000:]
  assert subprocs.finish(ref) == 0, subprocs.output(ref)[-3000:]
  resumed = json.loads((tmp_path / "run" / "results.json").read_text())
  assert resumed["resumed_from_step"] and resumed["resumed_from_step"] > stopped_at

  assert any((tmp_path / "jax_cache").iterdir()), "persistent compilation cache was not written"
  a, b = subprocs.load_params(tmp_path / "ref"), subprocs.load_params(tmp_path / "run")
  assert int(a.pop("step")) == int(b.pop("step")) == 40
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise
