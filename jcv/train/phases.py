"""Runs of several phases, or on cached features: how ``fit`` trains them.

Each phase (``Config.phases``, or the run itself) trains in ``WORKDIR/phases/<i>`` with the
loop of every run (jcv.train.loop.train), starting from the previous phase's weights. A phase
whose bottom is frozen (``trainable`` "head" or N) trains on the bottom's features when the run
has a ``feature_cache``: they are computed once (jcv.train.features, keyed by everything that
determines them) and the top alone runs in the loop. A run's ``steps`` is a budget shared out
in phase order. At the end the whole model is saved in ``WORKDIR/checkpoints`` with the run's
config, so WORKDIR is a run folder like any other; metrics.jsonl joins the phases' records
(steps and epochs counted from the start of the run, with a ``phase`` number).
"""
from __future__ import annotations

import json
import pathlib
import time

import jax

from jcv import safefile
from jcv.train import build, evaluation, features as feat, log as log_lib, loop, parallel
from jcv.train.config import Config
from jcv.train.state import create_train_state, init_variables

__all__ = ["run", "cut_stage"]


def cut_stage(config: Config, model) -> int:
  """Where a phase's frozen bottom ends: the stage count for ``trainable="head"``, count - N
  for ``trainable=N``, 0 (nothing frozen) for ``"all"`` and ``"backbone"``."""
  if config.trainable == "all":
    return 0
  return len(model.stage_names()) - build.trainable_stages(config, model)


def _feature_inputs(config: Config, model, variables, cut, base, *, train_src, eval_src, workdir):
  """(phase config, top model, top variables, loaders) of a phase training the stages from
  ``cut`` up on features cached at stage ``base`` (the lowest cut of the run's phases)."""
  options = {"flip": True, "crop_views": 0, "directory": None, **(config.feature_cache or {})}
  count = len(model.stage_names())
  if cut not in (base, count):
    raise ValueError(f"a phase training from stage {cut} cannot use features cached at stage {base}: "
                     "the cached phases of a run train the same top stages, or the head alone")
  sources = {"train": train_src, **({"eval": eval_src} if eval_src is not None else {})}
  cached = feat.cache_features(model, variables, sources, stage=base, image_size=config.image_size,
                               crop_fraction=config.eval_crop_fraction, mean=config.mean, std=config.std,
                               flip=options["flip"], crop_views=options["crop_views"], seed=config.seed,
                               directory=options["directory"] or pathlib.Path(workdir) / "features")
  if cut == count and base < count:  # the head alone: run the frozen top stages once more
    cached = feat.pool_cached(model, variables, cached, stage=base)
  phase_model = model.clone(**loop._stage_options(build.train_config(config, model)))
  _, top = feat.split_model(phase_model, cut)
  x, y = cached["train"]
  batch = min(config.batch_size, len(y))
  data = {"train_ld": feat.FeatureLoader(x, y, batch_size=batch, seed=config.seed),
          "eval_ld": (feat.FeatureLoader(*cached["eval"], batch_size=batch, train=False)
                      if "eval" in cached else None),
          "input_shape": x.shape[1:]}
  return config.replace(batch_size=batch, eval_batch_size=batch), top, feat.top_variables(variables, model, cut), data


def run(config: Config, workdir, *, model, variables, train_src, eval_src, class_names, augment_fn,
        resume: bool = True) -> dict:
  """Trains every phase of ``config`` in turn (see the module docstring) -> results dict."""
  started = time.time()
  workdir = pathlib.Path(workdir)
  if config.feature_cache is not None and jax.process_count() > 1:
    raise ValueError("feature_cache runs on one process; drop feature_cache for multi-host runs")
  if variables is None:
    variables = init_variables(jax.random.key(config.seed), model,
                               (1, config.image_size, config.image_size, 3))
  variables = jax.device_get(variables)
  phases = config.phase_configs()
  cuts = [cut_stage(p, model) if config.feature_cache is not None else 0 for p in phases]
  base = min([c for c in cuts if c] or [0])
  options = dict(config.feature_cache or {})
  unknown = set(options) - {"flip", "crop_views", "stage", "directory"}
  if unknown:
    raise ValueError(f"feature_cache: unknown option(s) {sorted(unknown)}; expected flip, crop_views, "
                     "stage, directory")
  if base and options.get("stage") is not None:  # cache lower than needed: shareable with other runs
    stage = int(options["stage"])
    stage += len(model.stage_names()) if stage < 0 else 0  # -N: below the top N stages
    if not 0 < stage <= base:
      raise ValueError(f"feature_cache stage {options['stage']} must be in [1, {base}] (or negative, from "
                       "the top), at or below the lowest frozen stage of the cached phases")
    base = stage
  remaining, records, summaries, offset = config.steps, [], [], (0, 0.0)
  for i, (phase, cut) in enumerate(zip(phases, cuts)):
    if cut:
      phase, phase_model, phase_vars, data = _feature_inputs(
          phase, model, variables, cut, base, train_src=train_src, eval_src=eval_src, workdir=workdir)
    else:
      phase_model, phase_vars = model, variables
      data = loop.image_loaders(phase, train_src, eval_src)
    phase_augment = augment_fn
    if phase.augment != config.augment:  # a phase with augmentation of its own
      phase_augment = build.build_augment(phase, config.num_classes or len(class_names))
    length = phase.steps or phase.epochs * data["train_ld"].steps_per_epoch
    if remaining is not None:
      length = min(length, remaining)
      remaining -= length
      if length == 0:
        break
      phase = phase.replace(steps=length)
    folder = workdir / "phases" / str(i)
    results, state = loop.train(phase.replace(plots=False), folder, model=phase_model, variables=phase_vars,
                                augment_fn=None if cut else phase_augment, class_names=class_names,
                                eval_src=None if cut else eval_src, resume=resume, features=bool(cut), **data)
    trained = jax.device_get(state.variables)
    variables = feat.merge_variables(variables, trained) if cut else trained
    records += [{**r, "phase": i, "step": r["step"] + offset[0],
                 **({"epoch": r["epoch"] + offset[1]} if "epoch" in r else {})}
                for r in log_lib.read_jsonl(folder / "metrics.jsonl")]
    offset = (offset[0] + results["steps"], offset[1] + results["epochs"])
    summaries.append({"phase": i, "trainable": phase.trainable, "cached_features": bool(cut),
                      **{k: results[k] for k in ("final", "steps", "epochs", "wall_time_s", "stopped_by")}})
    if results["stopped_by"]:
      break
  return _finish(config, workdir, model, variables, class_names, records, summaries, started,
                 eval_src=eval_src, train_src=train_src)


def _finish(config, workdir, model, variables, class_names, records, summaries, started, *, eval_src, train_src):
  """Saves the whole model as the run folder's checkpoint, the joined metrics, results, figures."""
  final = summaries[-1]["final"]
  metrics = {k: v for k, v in (final["eval"] or {}).items() if k in ("loss", "top1", "top5")}
  steps = summaries[-1]["steps"] if len(summaries) == 1 else sum(s["steps"] for s in summaries)
  evaluation.save_run(workdir, config, model, variables, class_names=class_names,
                      metrics=metrics or None, step=max(steps, 1))
  safefile.write_atomic(workdir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
  results = {"final": final, "best": loop._best_eval(workdir / "metrics.jsonl", config.best_metric),
             "steps": steps, "epochs": sum(s["epochs"] for s in summaries), "phases": summaries,
             "wall_time_s": time.time() - started, "stopped_by": summaries[-1]["stopped_by"],
             "train_img_per_s": None, "resumed_from_step": None}
  log_lib.write_json(workdir / "results.json", results)
  if config.plots and eval_src is not None and results["stopped_by"] is None:
    mesh = parallel.make_mesh()
    tx = build.checkpoint_optimizer(config, model)
    state = create_train_state(jax.random.key(config.seed), model, tx,
                               (1, config.image_size, config.image_size, 3), variables=variables)
    eval_ld = loop.image_loaders(config, train_src, eval_src)["eval_ld"]
    loop.draw_figures(workdir, parallel.replicate(state, mesh), eval_ld, config, mesh, class_names, eval_src)
  return results
