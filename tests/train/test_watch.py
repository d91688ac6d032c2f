"""After each evaluation: early stopping (and restoring the best weights), the plateau schedule
(its state resumes bitwise after kill -9), user callbacks that stop a run."""
import json

import numpy as np
import pytest

import subprocs
from tiny import TinyCNN, array_sources

from jcv.train import (Augment, Config, Data, EarlyStopping, Evaluation, Optim, Plateau, Run, Schedule, checkpoint,
                       fit)
from jcv.train.watch import stalled_for

# A rate high enough that the validation loss of the tiny model stalls within a few epochs.
BASE = Config(data=Data(image_size=8, batch_size=16, mean=None, std=None), augment=Augment(ops=()),
              optim=Optim(learning_rate=0.5), schedule=Schedule(name="constant"),
              evaluation=Evaluation(best_metric="loss"),
              run=Run(length="30 epochs", progress=False, plots=False, compilation_cache=None))


def _evals(workdir):
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [r for r in records if r["split"] == "eval"]


def test_stalled_for_counts_evaluations_since_the_last_improvement():
  assert stalled_for([0.5, 0.6, 0.6, 0.59], min_delta=0.0, higher_is_better=True) == 2
  assert stalled_for([0.5, 0.6, 0.62], min_delta=0.05, higher_is_better=True) == 1  # +0.02 is no gain
  assert stalled_for([2.0, 1.5, 1.6], min_delta=0.0, higher_is_better=False) == 1
  assert stalled_for([], min_delta=0.0, higher_is_better=True) == 0


def test_early_stopping_stops_a_stalled_run_and_restores_the_best_weights(tmp_path):
  train, ev = array_sources(128, 64)
  config = BASE.replace(evaluation={"early_stopping": EarlyStopping(patience=2)})
  results = fit(config, workdir=tmp_path / "run", train_source=train, eval_source=ev, model=TinyCNN())
  evals = _evals(tmp_path / "run")
  losses = [r["loss"] for r in evals]
  assert results["stopped_by"] == "early_stopping" and results["steps"] < results["total_steps"] == 240
  assert stalled_for(losses, min_delta=0.0, higher_is_better=False) == 2  # stopped at the second stall
  assert stalled_for(losses[:-1], min_delta=0.0, higher_is_better=False) < 2  # and not before
  best = evals[int(np.argmin(losses))]
  assert results["best_step"] == best["step"] < results["steps"]
  assert results["final"]["eval"]["loss"] == best["loss"]  # the run ends on its best weights
  saved = checkpoint.RunCheckpointer(tmp_path / "run" / "checkpoints", best_metric="loss", best_mode="min")
  assert saved.best_step() == best["step"]  # kept for `jcv evaluate`, which reads the best checkpoint
  saved.close()
  # Re-running the finished run decides the same from metrics.jsonl: nothing trains again.
  again = fit(config, workdir=tmp_path / "run", train_source=train, eval_source=ev, model=TinyCNN())
  assert again["stopped_by"] == "early_stopping" and again["steps"] == results["steps"]
  assert len(_evals(tmp_path / "run")) == len(evals)


def test_plateau_cuts_the_rate_when_the_metric_stalls(tmp_path):
  train, ev = array_sources(128, 64)
  config = BASE.replace(run={"length": "12 epochs", "log_every": "8 steps"},
                        schedule={"plateau": Plateau(patience=1, factor=0.5, min_delta=10.0)})
  fit(config, workdir=tmp_path / "run", train_source=train, eval_source=ev, model=TinyCNN())
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  rates = [r["lr"] for r in records if r["split"] == "train"]
  # Logged at steps 8, 16, ... before that step's evaluation. min_delta 10: every evaluation
  # after the first (step 8) is a stall, so each one from step 16 on halves the rate.
  assert rates[:6] == [0.5, 0.5, 0.25, 0.125, 0.0625, 0.03125], rates
  assert min(rates) == pytest.approx(0.5 * Plateau().min_scale)  # never below min_scale of the rate


def test_a_callback_stops_the_run(tmp_path):
  train, ev = array_sources(128, 64)
  seen = []
  def stop_at_epoch_3(event):
    seen.append((event["step"], event["epoch"], sorted(event["metrics"])))
    return event["epoch"] >= 3
  results = fit(BASE, workdir=tmp_path / "run", train_source=train, eval_source=ev, model=TinyCNN(),
                callbacks=[stop_at_epoch_3])
  assert results["stopped_by"] == "callback" and results["steps"] == 24
  assert [s[:2] for s in seen] == [(8, 1.0), (16, 2.0), (24, 3.0)] and "top1" in seen[0][2]


@pytest.mark.timeout(600)
def test_kill_9_after_a_plateau_cut_resumes_bitwise(tmp_path):
  args = ("--steps", 40, "--checkpoint-every", 4, "--set", "evaluation.every=4 steps",
          "--set", "schedule.plateau.patience=1", "--set", "schedule.plateau.min_delta=10.0",
          "--set", f"run.compilation_cache={tmp_path / 'jax_cache'}")
  ref = subprocs.launch(tmp_path / "ref", *args, devices=2)
  run = subprocs.launch(tmp_path / "run", *args, devices=2, env={"JCV_TEST_KILL_IN_SAVE": "16"})
  run.wait()
  assert run.returncode == -9, subprocs.output(run)[-2000:]  # killed while writing step 16, after cuts at 8, 12
  run = subprocs.launch(tmp_path / "run", *args, devices=2)
  assert subprocs.finish(run) == 0, subprocs.output(run)[-3000:]
  assert subprocs.finish(ref) == 0, subprocs.output(ref)[-3000:]
  rates = [r["lr"] for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines())
           if r["split"] == "train"]
  assert rates[-1] < rates[0] / 8  # the plateau cut the rate three times or more
  a, b = subprocs.load_params(tmp_path / "ref"), subprocs.load_params(tmp_path / "run")
  assert int(a.pop("step")) == int(b.pop("step")) == 40 and a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)  # bitwise
