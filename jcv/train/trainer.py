"""The trainer: ``fit(config, workdir=...)`` runs every regime, read top to bottom.

Setup (validate, workdir, compilation cache) -> data (sources, classes) -> model and initial
weights (jcv.train.init_from) -> the loop (jcv.train.loop: resume, steps, evaluation,
checkpoints) -> report. A run with ``phases`` is an outer loop over the same steps, one
``WORKDIR/phases/<i>`` folder per phase, each from the previous phase's weights; a phase
whose bottom is frozen trains on cached features (jcv.train.features) when the run has
``init.feature_cache``. A phased run ends with the whole model saved in ``WORKDIR/checkpoints``,
so WORKDIR is a run folder like any other.
"""
from __future__ import annotations

import json
import pathlib
import time

import jax

from jcv import safefile
from jcv.train import build, durations, features as feat, init_from, log as log_lib, loop, parallel, rundir
from jcv.train.config import Config
from jcv.train.evaluation import save_run
from jcv.train.state import create_train_state, init_variables

__all__ = ["fit"]


@rundir.owns_workdir  # locks the workdir for the call; restart=True moves an old run aside
def fit(config: Config, *, workdir, train_source=None, eval_source=None, model=None,
        augment_fn="auto", resume: bool = True, init_variables: dict | None = None, callbacks=(),
        restart: bool = False) -> dict:
  """Trains per ``config`` in ``workdir`` and returns the results dict (also results.json).

  Every regime is a config: from scratch; from ``init.pretrained``/``init.whiten``;
  ``init.trainable`` parts; ``init.feature_cache``; ``phases``. Re-running with the same
  ``workdir`` resumes bitwise-identically. Sources, model, augmentation and initial variables
  can be passed instead of being built from the config. ``callbacks``: functions called after
  each evaluation with ``{"step", "epoch", "metrics", "state", "workdir"}``; one returning True
  stops the run (jcv.train.watch). ``restart=True`` moves an old run aside once data, model and
  initial weights are built (jcv.train.rundir.restart_run). Raises
  jcv.train.loop.NonFiniteLossError naming the step if the loss becomes NaN/inf;
  SIGINT/SIGTERM save a checkpoint and return early with ``results["stopped_by"]`` set.
  """
  # ---------------------------------------------------------------- setup
  config = init_from.resolve_preprocessing(config).validate()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  build.enable_compilation_cache(config, workdir)
  # ---------------------------------------------------------------- data
  train_src, eval_src = build.build_sources(config, train_source, eval_source)
  class_names = list(getattr(train_src, "class_names", []) or [])
  num_classes = _num_classes(config, class_names)
  # ---------------------------------------------------------------- model, initial weights
  model = model if model is not None else build.build_model(config, num_classes)
  if init_variables is None:
    init_variables = init_from.initial_variables(config, model, train_src)
  if isinstance(augment_fn, str) and augment_fn == "auto":
    augment_fn = build.build_augment(config, num_classes)
  if restart:  # every argument checked: now an old run may move aside
    rundir.restart_run(workdir)
  # ---------------------------------------------------------------- the loop, or phases in turn
  parts = {"model": model, "class_names": class_names, "augment_fn": augment_fn, "eval_src": eval_src,
           "resume": resume, "callbacks": callbacks}
  if not config.run.phases and config.init.feature_cache is None:
    results, _ = loop.train(config, workdir, variables=init_variables, **parts,
                            **build.image_loaders(config, train_src, eval_src))
    return results
  return _fit_phases(config, workdir, variables=init_variables, train_src=train_src, **parts)


def _num_classes(config: Config, class_names: list) -> int:
  num_classes = config.model.num_classes or len(class_names)
  if not num_classes:
    raise ValueError("the number of classes is unknown: the source has no class_names; set model.num_classes")
  if num_classes < 2:
    raise ValueError(f"the training data has {num_classes} class ({class_names}): a classifier needs "
                     "at least 2; check --data-dir (one sub-folder per class)")
  return num_classes


def _fit_phases(config, workdir, *, model, variables, train_src, eval_src, class_names, augment_fn, resume,
                callbacks):
  """Each phase in turn, in ``WORKDIR/phases/<i>``; then the run folder's checkpoint and report."""
  started = time.time()
  if config.init.feature_cache is not None and jax.process_count() > 1:
    raise ValueError("init.feature_cache runs on one process; drop it for multi-host runs")
  if variables is None:
    variables = init_variables(jax.random.key(config.run.seed), model, (1,) + build.example_shape(config))
  variables = jax.device_get(variables)
  phases = config.phase_configs()
  cuts = [feat.cut_stage(p, model) if config.init.feature_cache is not None else 0 for p in phases]
  base = feat.cache_stage(config, model, cuts) if config.init.feature_cache is not None else 0
  budget, records, summaries, offset = _Budget(config.run.length), [], [], (0, 0.0)
  for i, (phase, cut) in enumerate(zip(phases, cuts)):
    if cut:
      phase, phase_model, phase_vars, data = feat.feature_data(
          phase, model, variables, cut, base, train_src=train_src, eval_src=eval_src, workdir=workdir)
    else:
      phase_model, phase_vars, data = model, variables, build.image_loaders(phase, train_src, eval_src)
    length = budget.take(build.total_steps(phase, data["train_ld"].steps_per_epoch))
    if length == 0:
      break
    folder = workdir / "phases" / str(i)
    results, state = loop.train(
        phase.replace(run={"length": f"{length} steps", "plots": False}), folder, model=phase_model,
        variables=phase_vars, augment_fn=None if cut else augment_fn, class_names=class_names,
        eval_src=None if cut else eval_src, resume=resume, features=bool(cut), callbacks=callbacks, **data)
    trained = jax.device_get(state.variables)
    variables = feat.merge_variables(variables, trained) if cut else trained
    records += [{**r, "phase": i, "step": r["step"] + offset[0], **({"epoch": r["epoch"] + offset[1]} if "epoch" in r else {})}
                for r in log_lib.read_jsonl(folder / "metrics.jsonl")]
    offset = (offset[0] + results["steps"], offset[1] + results["epochs"])
    summaries.append({"phase": i, "trainable": phase.init.trainable, "cached_features": bool(cut),
                      **{k: results[k] for k in ("final", "steps", "epochs", "wall_time_s", "stopped_by")}})
    if results["stopped_by"] not in (None, "early_stopping"):  # early stopping ends its phase only
      break
  return _report_phases(config, workdir, model, variables, class_names, records, summaries, started,
                        eval_src=eval_src, train_src=train_src)


class _Budget:
  """A run length given in steps is a budget the phases spend in order; in epochs it is
  their sum (Config.with_length keeps it so) and cuts nothing."""

  def __init__(self, length: str):
    number, unit = durations.parse(length)
    self.remaining = int(number) if unit == "steps" else None

  def take(self, steps: int) -> int:
    if self.remaining is None:
      return steps
    steps = min(steps, self.remaining)
    self.remaining -= steps
    return steps


def _report_phases(config, workdir, model, variables, class_names, records, summaries, started, *, eval_src,
                   train_src):
  """Saves the whole model as the run folder's checkpoint, the joined metrics, results, figures."""
  final = summaries[-1]["final"]
  metrics = {k: v for k, v in (final["eval"] or {}).items() if k in ("loss", "top1", "top5")}
  steps = sum(s["steps"] for s in summaries)
  save_run(workdir, config, model, variables, class_names=class_names, metrics=metrics or None, step=max(steps, 1))
  safefile.write_atomic(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
  results = {"final": final, "best": loop.best_eval(workdir / "metrics.jsonl", config.evaluation.best_metric),
             "steps": steps, "epochs": sum(s["epochs"] for s in summaries), "phases": summaries,
             "wall_time_s": time.time() - started, "stopped_by": summaries[-1]["stopped_by"],
             "train_img_per_s": None, "resumed_from_step": None}
  log_lib.write_json(workdir / "results.json", results)
  if config.run.plots and eval_src is not None and results["stopped_by"] is None:
    mesh = parallel.make_mesh()
    state = create_train_state(jax.random.key(config.run.seed), model, build.checkpoint_optimizer(config, model),
                               (1,) + build.example_shape(config), variables=variables)
    eval_ld = build.image_loaders(config, train_src, eval_src)["eval_ld"]
    loop.draw_figures(workdir, parallel.replicate(state, mesh), eval_ld, config, mesh, class_names, eval_src)
  return results
