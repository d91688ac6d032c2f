"""What happens after each evaluation of a run: the plateau factor, user callbacks, early stopping.

Each is a function of the run's evaluations, so a resumed run decides exactly as an unbroken
one: the plateau state is part of the optimizer state (checkpointed), and early stopping reads
the evaluation history back from ``metrics.jsonl``.

A callback is ``fn(event) -> bool | None`` with ``event = {"step", "epoch", "metrics", "state",
"workdir"}``; returning True stops the run (``results["stopped_by"] == "callback"``), as a
Keras callback setting ``model.stop_training`` does. Callbacks run on every process and must
return the same answer on each.
"""
from __future__ import annotations

import pathlib

from jcv.train import log as log_lib, optax_extras, parallel

__all__ = ["EvalWatch", "stalled_for"]


def stalled_for(values, *, min_delta: float, higher_is_better: bool) -> int:
  """How many evaluations have passed since ``values`` last improved by more than ``min_delta``."""
  best, bad = None, 0
  for v in values:
    if best is None or ((v - best) if higher_is_better else (best - v)) > min_delta:
      best, bad = v, 0
    else:
      bad += 1
  return bad


class EvalWatch:
  """The after-evaluation decisions of one run folder (see the module docstring)."""

  def __init__(self, config, workdir, start_step: int, callbacks=()):
    self.config, self.workdir, self.callbacks = config, pathlib.Path(workdir), tuple(callbacks or ())
    self.metric = config.evaluation.best_metric
    self.higher = self.metric != "loss"
    path = self.workdir / "metrics.jsonl"
    records = log_lib.read_jsonl(path) if path.exists() else []
    self.history = [r for r in records if r.get("split") == "eval" and r["step"] <= start_step and self.metric in r]

  def observe_plateau(self, state, metrics: dict, mesh):
    """``state`` with its plateau factor updated by this evaluation (unchanged without a plateau)."""
    p = self.config.schedule.plateau
    if p is None:
      return state
    def observe(s):
      new = optax_extras.observe_plateau(s, float(metrics[self.metric]), factor=p.factor, patience=p.patience,
                                         min_delta=p.min_delta, cooldown=p.cooldown, min_scale=p.min_scale,
                                         higher_is_better=self.higher)
      return parallel.replicate(new, mesh)
    return state.replace(opt_state=optax_extras.map_plateau(state.opt_state, observe))

  def after_eval(self, step: int, steps_per_epoch: int, metrics: dict, state) -> str | None:
    """Records the evaluation, calls the callbacks -> "callback" / "early_stopping" to stop, else None."""
    self.history.append({"step": step, **metrics})
    event = {"step": step, "epoch": step / steps_per_epoch, "metrics": dict(metrics), "state": state,
             "workdir": self.workdir}
    if any(cb(event) is True for cb in self.callbacks):
      return "callback"
    return self.stopped_before()

  def stopped_before(self) -> str | None:
    """"early_stopping" when the evaluations so far call for it (a resumed run that had stopped), else None."""
    es = self.config.evaluation.early_stopping
    if es is None or not self.history:
      return None
    values = [r[self.metric] for r in self.history]
    due = stalled_for(values, min_delta=es.min_delta, higher_is_better=self.higher) >= es.patience
    return "early_stopping" if due else None

  def record_at(self, step: int) -> dict | None:
    """The evaluation record of ``step`` (None if there is none)."""
    found = [r for r in self.history if r["step"] == step]
    return {k: v for k, v in found[-1].items() if k not in ("split", "time")} if found else None
