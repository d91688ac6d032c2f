"""The trainer: ``fit(config, workdir=...)`` for every regime.

fit builds data, model and initial variables from the config (jcv.train.build,
jcv.train.init_from); a run with ``phases`` or a ``feature_cache`` goes through
jcv.train.phases, which calls the same loop once per phase. The loop resumes from the newest
checkpoint in its folder, runs the compiled step over the device mesh with a bounded number of
steps in flight, evaluates and checkpoints every epoch (and every ``checkpoint_every`` steps)
and writes TensorBoard, metrics.jsonl, config.json, class_names.json, results.json and figures.
Precise BatchNorm runs after the loop; evaluation lives in jcv.train.evaluation.
"""
from __future__ import annotations

import contextlib
import pathlib
import platform
import signal
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jcv.train import build, checkpoint as ckpt_lib, init_from, log as log_lib, parallel, rundir
from jcv.train.build import (build_augment, build_model, enable_compilation_cache, eval_view,  # noqa: F401
                             source_spec)
from jcv.train.config import Config
from jcv.train.evaluation import collect_logits, evaluate, load_run, run_eval  # noqa: F401
from jcv.train.optim import make_optimizer
from jcv.train.precise_bn import recompute_batch_stats  # noqa: F401
from jcv.train.state import create_train_state

__all__ = [
    "NonFiniteLossError", "fit", "train", "image_loaders", "draw_figures", "evaluate", "load_run", "run_eval", "collect_logits",
    "enable_compilation_cache", "build_model", "build_augment", "source_spec", "eval_view",
    "recompute_batch_stats",
]


_train_fn = build.train_fn  # the name older callers (benchmarks/optimizers.py) use


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/inf; the message names the step."""


@rundir.owns_workdir  # locks the workdir for the call; restart=True moves an old run aside
def fit(config: Config, *, workdir, train_source=None, eval_source=None, model=None,
        augment_fn="auto", resume: bool = True, init_variables: dict | None = None,
        restart: bool = False) -> dict:
  """Trains per ``config`` in ``workdir`` and returns the results dict (also results.json).

  Every regime is a config: from scratch; from ``config.init_from`` (pretrained weights, a
  whitened first layer); ``trainable`` parts ("all", "head" or the top N stages);
  ``feature_cache`` (the frozen bottom's features computed once, keyed by what determines
  them); ``phases`` run one after the other, each from the previous one's weights. The
  workdir is a run folder for ``evaluate``/``predict`` (checkpoints, config.json,
  class_names.json). Re-running with the same ``workdir`` resumes bitwise-identically.
  Sources, model, augmentation and initial variables can be passed instead of being built
  from the config. Raises NonFiniteLossError naming the step if the loss becomes NaN/inf (the
  last good checkpoint stays); ``restart=True`` moves an old run aside once data, model and
  initial weights are built (rundir.restart_run); SIGINT/SIGTERM save a checkpoint and return early with
  ``results["stopped_by"]`` set.
  """
  config = init_from.resolve_preprocessing(config).validate()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  enable_compilation_cache(config, workdir)
  train_src, eval_src = build.build_sources(config, train_source, eval_source)
  class_names = list(getattr(train_src, "class_names", []) or [])
  num_classes = config.num_classes or len(class_names)
  if not num_classes:
    raise ValueError("num_classes is unknown: the source has no class_names; set config.num_classes")
  if num_classes < 2:
    raise ValueError(f"the training data has {num_classes} class ({class_names}): a classifier needs "
                     "at least 2; check --data-dir (one sub-folder per class)")
  model = model if model is not None else build_model(config, num_classes)
  if init_variables is None:
    init_variables = init_from.initial_variables(config, model, train_src)
  if isinstance(augment_fn, str) and augment_fn == "auto":
    augment_fn = build_augment(config, num_classes)
  if restart:
    rundir.restart_run(workdir)
  if len(config.phase_configs()) > 1 or config.feature_cache is not None:
    from jcv.train import phases
    return phases.run(config, workdir, model=model, variables=init_variables, train_src=train_src,
                      eval_src=eval_src, class_names=class_names, augment_fn=augment_fn, resume=resume)
  data = image_loaders(config, train_src, eval_src)
  results, _ = train(config, workdir, model=model, variables=init_variables, augment_fn=augment_fn,
                     class_names=class_names, eval_src=eval_src, resume=resume, **data)
  return results


def image_loaders(config: Config, train_src, eval_src) -> dict:
  """{"train_ld", "eval_ld", "input_shape"}: the image pipelines of a run (per-process batches)."""
  from jcv.data import pipeline
  pcount = jax.process_count()
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.device_count()} devices")
  train_ld = pipeline.train_loader(train_src, batch_size=config.batch_size // pcount,
                                   image_size=config.image_size, seed=config.seed, crop=config.crop,
                                   scale=tuple(config.crop_scale),
                                   flip={"none": False, "random": True}.get(config.host_flip, config.host_flip),
                                   num_workers=config.num_workers)
  eval_bs = (config.eval_batch_size or config.batch_size) // pcount
  eval_ld = (pipeline.eval_loader(eval_src, batch_size=eval_bs, num_workers=config.num_workers,
                                  **eval_view(config)) if eval_src is not None else None)
  return {"train_ld": train_ld, "eval_ld": eval_ld,
          "input_shape": (config.image_size, config.image_size, 3)}


def _stage_options(config: Config) -> dict:
  return {k: v for k, v in config.model_options.items() if k in ("frozen_stages", "frozen_bn_stages")}


def _compiled_steps(config, tconfig, state, mesh, *, train_ld, eval_ld, input_shape, num_classes,
                    augment_fn, schedule, features):
  """The train and eval steps, compiled ahead of time, so that no process enters the first
  collective while another is still compiling (CPU gloo connections time out after ~30 s)."""
  train_fn = parallel.compile_train_step(
      build.train_fn(tconfig, num_classes=num_classes, augment_fn=augment_fn,
                     schedule=schedule, features=features), mesh, mode=config.parallel)
  eval_fn = parallel.compile_eval_step(build.eval_fn(config, features=features), mesh, mode=config.parallel)
  dtype = train_ld.features.dtype if features else np.uint8
  train_fn = train_fn.lower(state, parallel.batch_spec(mesh, config.batch_size, tuple(input_shape),
                                                       dtype=dtype)).compile()
  if eval_ld is not None:
    eval_shape = tuple(input_shape) if features else (eval_view(config)["image_size"],) * 2 + (3,)
    eval_fn = eval_fn.lower(state, parallel.batch_spec(mesh, eval_ld.batch_size * jax.process_count(),
                                                       eval_shape, mask=True, dtype=dtype)).compile()
  return train_fn, eval_fn


def train(config: Config, workdir, *, model, train_ld, eval_ld, input_shape, variables=None,
          augment_fn=None, class_names=(), eval_src=None, resume: bool = True,
          features: bool = False):
  """The training loop of one run folder -> (results, final state).

  ``train_ld``/``eval_ld``: loaders (jcv.data.pipeline, or jcv.train.features.FeatureLoader
  with ``features=True``: inputs are cached features, not images); ``input_shape``: one
  example's shape; ``variables``: initial variables (None: the model's random init from
  ``config.seed``). Most callers want :func:`fit`.
  """
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  started = time.time()
  is_main = jax.process_index() == 0
  mesh = parallel.make_mesh()
  tconfig = build.train_config(config, model)  # `trainable` -> freeze, lr groups, frozen stages
  if not features and config.trainable != "all":
    model = model.clone(**_stage_options(tconfig))
  steps_per_epoch = train_ld.steps_per_epoch
  total_steps = config.steps or config.epochs * steps_per_epoch
  tx, schedule = make_optimizer(tconfig, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  state = create_train_state(jax.random.key(config.seed), model, tx, (1,) + tuple(input_shape),
                             variables=variables)
  state = parallel.replicate(state, mesh)
  checkpointer = ckpt_lib.RunCheckpointer(
      workdir / "checkpoints", keep=config.keep_checkpoints, best_metric=config.best_metric,
      best_mode="min" if config.best_metric == "loss" else "max")
  iterator = train_ld.iter_from(0)
  # A run's checkpoints are resumed only by the same run (rundir.resume refuses others).
  num_classes = config.num_classes or len(class_names)
  restored = rundir.resume(checkpointer, state, workdir=workdir, is_main=is_main, current=rundir.describe(
      config, class_names=list(class_names), num_classes=num_classes, total_steps=total_steps,
      steps_per_epoch=steps_per_epoch, state=state)) if resume else None
  if restored is not None:
    state, data_state, _, _ = restored
    iterator.set_state(data_state)
  start_step = int(parallel.fetch(state.step))
  if is_main:
    log_lib.write_json(workdir / "config.json", config.to_dict())
    log_lib.write_json(workdir / "class_names.json", list(class_names))
  logger = log_lib.MetricLogger(workdir, enabled=is_main, keep_until=start_step)
  train_fn, eval_fn = _compiled_steps(config, tconfig, state, mesh, train_ld=train_ld, eval_ld=eval_ld,
                                      input_shape=input_shape, num_classes=num_classes,
                                      augment_fn=augment_fn, schedule=schedule, features=features)
  run = _Run(config, state, checkpointer, iterator, logger, train_fn, eval_fn, eval_ld, mesh,
             steps_per_epoch, total_steps, start_step, is_main)
  try:
    run.loop(augment_fn, train_ld)
    if (run.step == total_steps and run.step > start_step and run.stopped_by is None
        and config.bn_recompute_images and run.state.batch_stats):
      # Precise BN once training is over, then the final evaluation and checkpoint.
      run.state = recompute_batch_stats(
          run.state, _first_batches(train_ld, config.bn_recompute_images, config.batch_size), mesh,
          augment_fn=augment_fn, mean=None if features else config.mean,
          std=None if features else config.std, freeze=tconfig.freeze)
      run.bn_recomputed = config.bn_recompute_images
      run.evaluate_and_save(final=True)
  finally:
    run.progress.close()
    if hasattr(iterator, "close"):
      iterator.close()
    checkpointer.wait()
    logger.flush()
  checkpointer.close()
  if run.last_eval is None and eval_ld is not None and run.step >= total_steps:  # re-run of a finished run
    run.last_eval = run_eval(run.state, eval_ld, eval_fn, mesh, max_in_flight=config.max_steps_in_flight)
    run.last_eval["epoch"] = run.step / steps_per_epoch
  results = run.results(workdir, started)
  if is_main:
    log_lib.write_json(workdir / "results.json", results)
    logger.hparams(config.to_dict(), {k: v for k, v in (run.last_eval or {}).items() if k != "n"})
    if config.plots and run.stopped_by is None and not features:
      draw_figures(workdir, run.state, eval_ld, config, mesh, class_names, eval_src)
  logger.close()
  return results, run.state


class _Run:
  """The state of one pass of the loop: steps, pending metrics, last evaluation, progress."""

  def __init__(self, config, state, checkpointer, iterator, logger, train_fn, eval_fn, eval_ld, mesh,
               steps_per_epoch, total_steps, start_step, is_main):
    self.config, self.state, self.checkpointer, self.iterator = config, state, checkpointer, iterator
    self.logger, self.train_fn, self.eval_fn, self.eval_ld, self.mesh = logger, train_fn, eval_fn, eval_ld, mesh
    self.steps_per_epoch, self.total_steps, self.start_step = steps_per_epoch, total_steps, start_step
    self.step, self.is_main = start_step, is_main
    self.last_eval, self.stopped_by, self.bn_recomputed = None, None, None
    self.running, self.timer = _Running(), _Throughput(config.batch_size)
    self.progress = log_lib.Progress(total=total_steps, start=start_step, steps_per_epoch=steps_per_epoch,
                                     enabled=is_main, bar=config.progress)

  def save(self, metrics=None):
    self.checkpointer.save(self.state, data_state=self.iterator.get_state(), config=self.config.to_dict(),
                           metrics=metrics)

  def evaluate_and_save(self, *, final: bool = False):
    """Evaluates (when there is eval data) and checkpoints with the metrics."""
    metrics = None
    if self.eval_ld is not None:
      metrics = run_eval(self.state, self.eval_ld, self.eval_fn, self.mesh,
                         max_in_flight=self.config.max_steps_in_flight)
      metrics["epoch"] = self.step / self.steps_per_epoch
      self.logger.scalars(self.step, metrics, split="eval")
      self.progress.eval(self.step, metrics)
      self.last_eval = metrics
      self.timer.restart()
    self.save({k: v for k, v in metrics.items() if k in ("loss", "top1", "top5")} if metrics else None)

  def loop(self, augment_fn, train_ld):
    """Steps until ``total_steps`` or a stop signal; evaluates and saves on the way."""
    config, pcount, pending = self.config, jax.process_count(), []
    # With precise BN the last evaluation and checkpoint come after it (see train).
    bn_after = bool(config.bn_recompute_images and self.state.batch_stats)
    with _stop_signals() as signals:
      if self.start_step == 0 and augment_fn is not None and self.is_main:
        _log_augmented_grid(self.logger, augment_fn, train_ld.iter_from(0), config)
      if pcount > 1:
        import orbax.checkpoint as ocp
        ocp.multihost.sync_global_processes("jcv_fit_start", timeout=600)
      while self.step < self.total_steps:
        batch = next(self.iterator)
        batch = {"image": batch["image"], "label": batch["label"]}
        self.state, metrics = self.train_fn(self.state, parallel.shard_batch(batch, self.mesh))
        self.step += 1
        step, last = self.step, self.step == self.total_steps
        pending.append(metrics)
        epoch_end = step % self.steps_per_epoch == 0
        log_now = step % config.log_every == 0 or last
        ckpt_now = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
        # Drain points are the same on every process; a stop request is only acted on there,
        # and agreed on by all processes (each may have received the signal at another step).
        drain_now = (len(pending) >= config.max_steps_in_flight or log_now or epoch_end or ckpt_now
                     or (signals and pcount == 1))
        stop = False
        if drain_now:
          _drain(pending, self.running, step, self.timer, self.checkpointer.latest_step())
          self.progress.show(step, self.running.last, self.timer.rate())  # bar on a terminal, else lines
          stop = _any_process(bool(signals)) if pcount > 1 else bool(signals)
        if log_now:
          self.logger.scalars(step, {**self.running.mean(), "img_per_s": self.timer.rate()}, split="train")
          self.running.reset()
        if last and bn_after and not stop:
          break
        eval_now = self.eval_ld is not None and (
            (epoch_end and (step // self.steps_per_epoch) % config.eval_every == 0) or last)
        if eval_now:
          self.evaluate_and_save()
        elif epoch_end or ckpt_now or stop or last:
          self.save()
        if stop:
          self.stopped_by = signal.Signals(signals[0]).name if signals else "SIGTERM"
          break

  def results(self, workdir, started) -> dict:
    """The results dict of the run (results.json)."""
    config, step = self.config, self.step
    return {
        "final": {"train": self.running.last, "eval": self.last_eval},
        "best": _best_eval(workdir / "metrics.jsonl", config.best_metric) if self.is_main else None,
        "best_step": self.checkpointer.best_step(),
        "steps": step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
        "epochs": step / self.steps_per_epoch,
        "wall_time_s": time.time() - started,
        "train_img_per_s": self.timer.overall(),
        "devices": {"count": jax.device_count(), "local": jax.local_device_count(),
                    "processes": jax.process_count(), "kind": jax.devices()[0].device_kind,
                    "platform": jax.devices()[0].platform},
        "parallel": config.parallel,
        "versions": _versions(),
        "resumed_from_step": self.start_step or None,
        "stopped_by": self.stopped_by,
        "bn_recomputed_images": self.bn_recomputed,
    }


# ------------------------------------------------------------------ helpers of the loop


@contextlib.contextmanager
def _stop_signals():
  """SIGINT/SIGTERM set a flag (the loop saves and exits) instead of killing the run."""
  received = []
  def handler(signum, frame):
    received.append(signum)
  previous = {}
  try:
    for s in (signal.SIGINT, signal.SIGTERM):
      previous[s] = signal.signal(s, handler)
  except ValueError:  # not in the main thread: leave signals alone
    previous = {}
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _versions() -> dict:
  import flax
  import optax
  import orbax.checkpoint as ocp
  import jaxlib
  return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__,
          "optax": optax.__version__, "orbax-checkpoint": getattr(ocp, "__version__", "?"),
          "numpy": np.__version__}


class _Running:
  """Host-side averages of the training metrics since the last log."""

  def __init__(self):
    self.last = {}
    self.reset()

  def reset(self):
    self.sums, self.count = {}, 0

  def add(self, m):
    for k, v in m.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1
    self.last = {k: float(v) for k, v in m.items()}

  def mean(self):
    out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    out.update(lr=self.last.get("lr", 0.0))
    return out


class _Throughput:
  """Images per second, excluding the first (compiling) window."""

  def __init__(self, batch_size):
    self.batch_size = batch_size
    self.t0, self.steps0 = None, 0
    self.total_time, self.total_steps = 0.0, 0
    self._rate = 0.0

  def mark(self, step):
    now = time.perf_counter()
    if self.t0 is not None and step > self.steps0:
      dt, ds = now - self.t0, step - self.steps0
      self._rate = ds * self.batch_size / dt
      self.total_time += dt
      self.total_steps += ds
    self.t0, self.steps0 = now, step

  def restart(self):
    self.t0 = None

  def rate(self):
    return self._rate

  def overall(self):
    return self.total_steps * self.batch_size / self.total_time if self.total_time else None


def _first_batches(loader, num_images: int, global_batch: int):
  from jcv.train.precise_bn import first_batches
  return first_batches(loader, num_images, global_batch)


def _any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any of them (a small collective)."""
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _drain(pending, running, step, timer, saved_step=None):
  """Waits for the pending steps' metrics (bounding steps in flight) and checks the loss
  (``saved_step``: the newest checkpoint, named in the error)."""
  host = parallel.fetch(pending)
  first = step - len(pending) + 1
  for i, m in enumerate(host):
    if not np.isfinite(m["loss"]):
      pending.clear()
      raise NonFiniteLossError(
          f"training loss is {float(m['loss'])} at step {first + i}; stopping ("
          + (f"the last good checkpoint, step {saved_step}, is kept" if saved_step is not None else
             "no checkpoint had been saved yet") + "). Lower the learning rate, add warmup or gradient clipping.")
    running.add(m)
  pending.clear()
  timer.mark(step)


def _best_eval(jsonl_path, name):
  """The best eval record of the whole run (all resumed segments) by ``name``."""
  if not pathlib.Path(jsonl_path).exists():
    return None
  evals = [r for r in log_lib.read_jsonl(jsonl_path) if r.get("split") == "eval" and name in r]
  if not evals:
    return None
  pick = min if name == "loss" else max
  best = dict(pick(evals, key=lambda r: r[name]))
  best.pop("split", None)
  best.pop("time", None)
  return best


def _log_augmented_grid(logger, augment_fn, it, config):
  batch = next(it)
  images = jnp.asarray(batch["image"][:32])
  out, _ = jax.jit(augment_fn)(jax.random.key(config.seed), images, jnp.asarray(batch["label"][:32]))
  logger.images(0, "train/augmented_batch", np.clip(np.asarray(out), 0.0, 1.0))
  if hasattr(it, "close"):
    it.close()


def draw_figures(workdir, state, eval_ld, config, mesh, class_names, eval_src):
  """curves.png, confusion.png and mistakes.png of a run in ``workdir`` (never raises)."""
  if eval_ld is None or jax.process_count() > 1:
    return
  try:
    from jcv import plots
    history = log_lib.read_jsonl(workdir / "metrics.jsonl")
    plots.training_curves(history, workdir / "curves.png")
    logits, labels, index = collect_logits(state, eval_ld, config, mesh)
    plots.confusion_matrix(labels, logits.argmax(-1), class_names, workdir / "confusion.png")
    plots.worst_mistakes(logits, labels, index, eval_src, class_names, workdir / "mistakes.png")
  except Exception as e:  # figures must never lose a finished run
    warnings.warn(f"could not draw figures: {e!r}")
