"""The training loop of one run folder: ``train(config, workdir, ...)`` -> (results, state).

It resumes from the newest checkpoint in the folder, runs the compiled step over the device
mesh with a bounded number of steps in flight, evaluates and checkpoints at the config's
intervals (and at every epoch end), re-estimates BatchNorm at the end if asked, and writes
TensorBoard, metrics.jsonl, config.json, class_names.json, results.json and figures.
:func:`jcv.train.trainer.fit` builds what it needs from a Config and calls it once per phase.
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

from jcv.train import build, checkpoint as ckpt_lib, durations, log as log_lib, parallel, rundir
from jcv.train.watch import EvalWatch
from jcv.train.config import Config
from jcv.train.evaluation import collect_logits, run_eval
from jcv.train.meters import RunningMeans, Throughput
from jcv.train.optim import make_optimizer
from jcv.train.precise_bn import first_batches, recompute_batch_stats
from jcv.train.state import create_train_state

__all__ = ["NonFiniteLossError", "train", "draw_figures", "best_eval"]


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/inf; the message names the step."""


def _compiled_steps(config, tconfig, state, mesh, *, train_ld, eval_ld, input_shape, num_classes,
                    augment_fn, schedule, features):
  """The train and eval steps, compiled ahead of time, so that no process enters the first
  collective while another is still compiling (CPU gloo connections time out after ~30 s)."""
  mode = config.run.parallel
  train_fn = parallel.compile_train_step(
      build.train_fn(tconfig, num_classes=num_classes, augment_fn=augment_fn,
                     schedule=schedule, features=features), mesh, mode=mode)
  eval_fn = parallel.compile_eval_step(build.eval_fn(config, features=features), mesh, mode=mode)
  dtype = train_ld.features.dtype if features else np.uint8
  train_fn = train_fn.lower(state, parallel.batch_spec(mesh, config.data.batch_size, tuple(input_shape),
                                                       dtype=dtype)).compile()
  if eval_ld is not None:
    eval_shape = tuple(input_shape) if features else (build.eval_view(config)["image_size"],) * 2 + (3,)
    eval_fn = eval_fn.lower(state, parallel.batch_spec(mesh, eval_ld.batch_size * jax.process_count(),
                                                       eval_shape, mask=True, dtype=dtype)).compile()
  return train_fn, eval_fn


def _setup(config, workdir, *, model, train_ld, input_shape, variables, class_names, resume, features,
           augment_fn):
  """(train config, state, checkpointer, iterator, total steps, schedule, mesh) of a run folder, resumed."""
  tconfig = build.train_config(config, model)  # `trainable` -> freeze, lr groups, frozen stages
  if not features and config.init.trainable != "all":
    model = model.clone(**build.stage_options(tconfig))
  spe = train_ld.steps_per_epoch
  total = build.total_steps(config, spe)
  tx, schedule = make_optimizer(tconfig, steps_per_epoch=spe, total_steps=total)
  state = create_train_state(jax.random.key(config.run.seed), model, tx, (1,) + tuple(input_shape),
                             variables=variables)
  num_classes = config.model.num_classes or len(class_names)
  mesh = build.train_mesh(config, build.train_fn(tconfig, num_classes=num_classes, augment_fn=augment_fn,
                                                 schedule=schedule, features=features),
                          state, input_shape=input_shape, num_classes=num_classes, features=features)
  state = parallel.replicate(state, mesh)
  best = config.evaluation.best_metric
  checkpointer = ckpt_lib.RunCheckpointer(workdir / "checkpoints", keep=config.run.keep_checkpoints,
                                          best_metric=best, best_mode="min" if best == "loss" else "max")
  iterator = train_ld.iter_from(0)
  restored = rundir.resume(checkpointer, state, workdir=workdir, is_main=jax.process_index() == 0,
                           current=rundir.describe(config, class_names=list(class_names), num_classes=num_classes,
                                                   total_steps=total, steps_per_epoch=spe, state=state)
                           ) if resume else None
  if restored is not None:
    state, data_state, _, _ = restored
    iterator.set_state(data_state)
  return tconfig, state, checkpointer, iterator, total, schedule, mesh


def train(config: Config, workdir, *, model, train_ld, eval_ld, input_shape, variables=None,
          augment_fn=None, class_names=(), eval_src=None, resume: bool = True, features: bool = False,
          callbacks=()):
  """The training loop of one run folder -> (results, final state).

  ``train_ld``/``eval_ld``: loaders (jcv.data.pipeline, or jcv.train.features.FeatureLoader
  with ``features=True``: inputs are cached features, not images); ``input_shape``: one
  example's shape; ``variables``: initial variables (None: the model's random init from
  ``run.seed``). Most callers want :func:`jcv.train.fit`.
  """
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  started, is_main = time.time(), jax.process_index() == 0
  tconfig, state, checkpointer, iterator, total, schedule, mesh = _setup(
      config, workdir, model=model, train_ld=train_ld, input_shape=input_shape, variables=variables,
      class_names=class_names, resume=resume, features=features, augment_fn=augment_fn)
  with checkpointer.full_disk_as_error(workdir):  # metrics, TensorBoard, results: one line too
    run = _start(config, tconfig, workdir, state, checkpointer, iterator, total, schedule, mesh,
                 train_ld=train_ld, eval_ld=eval_ld, input_shape=input_shape, augment_fn=augment_fn,
                 class_names=class_names, features=features, callbacks=callbacks)
    try:
      run.loop(augment_fn, train_ld)
      if run.finished_cleanly() and config.evaluation.bn_recompute and run.state.batch_stats:
        run.recompute_bn(train_ld, augment_fn, freeze=tconfig.optim.freeze, features=features)
      if run.stopped_by == "early_stopping" and config.evaluation.early_stopping.restore_best:
        run.restore_best()
    except BaseException:
      run.close(iterator, quiet=True)  # the error on its way out is the one to report
      raise
    run.close(iterator)
    if run.last_eval is None and eval_ld is not None and run.step >= total:  # re-run of a finished run
      run.last_eval = run_eval(run.state, eval_ld, run.eval_fn, mesh, max_in_flight=config.run.max_steps_in_flight)
      run.last_eval["epoch"] = run.step / train_ld.steps_per_epoch
    results = run.results(workdir, started)
    if is_main:
      log_lib.write_json(workdir / "results.json", results)
      run.logger.hparams(config.to_dict(), {k: v for k, v in (run.last_eval or {}).items() if k != "n"})
      if config.run.plots and not str(run.stopped_by).startswith("SIG") and not features:
        draw_figures(workdir, run.state, eval_ld, config, mesh, class_names, eval_src)
    run.logger.close()
  return results, run.state


def _start(config, tconfig, workdir, state, checkpointer, iterator, total, schedule, mesh, *, train_ld, eval_ld,
           input_shape, augment_fn, class_names, features, callbacks) -> "_Run":
  """Writes the run's config files, compiles the steps and opens the logs: the loop's state."""
  is_main = jax.process_index() == 0
  if is_main:
    log_lib.write_json(workdir / "config.json", config.to_dict())
    log_lib.write_json(workdir / "class_names.json", list(class_names))
  train_fn, eval_fn = _compiled_steps(
      config, tconfig, state, mesh, train_ld=train_ld, eval_ld=eval_ld, input_shape=input_shape,
      num_classes=config.model.num_classes or len(class_names), augment_fn=augment_fn, schedule=schedule,
      features=features)
  logger = log_lib.MetricLogger(workdir, enabled=is_main, keep_until=int(parallel.fetch(state.step)))
  run = _Run(config, state, checkpointer, iterator, logger,
             (train_fn, eval_fn), eval_ld, mesh, steps_per_epoch=train_ld.steps_per_epoch, total_steps=total)
  run.watch = EvalWatch(config, workdir, run.start_step, callbacks)
  return run


class _Run:
  """The state of one pass of the loop: steps, pending metrics, last evaluation, progress."""

  def __init__(self, config, state, checkpointer, iterator, logger, steps, eval_ld, mesh, *, steps_per_epoch,
               total_steps):
    self.config, self.state, self.checkpointer, self.iterator = config, state, checkpointer, iterator
    self.logger, (self.train_fn, self.eval_fn), self.eval_ld, self.mesh = logger, steps, eval_ld, mesh
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.start_step = self.step = int(parallel.fetch(state.step))
    self.is_main = jax.process_index() == 0
    self.last_eval, self.stopped_by, self.bn_recomputed = None, None, None
    self.running, self.timer = RunningMeans(), Throughput(config.data.batch_size)
    self.progress = log_lib.Progress(total=total_steps, start=self.step, steps_per_epoch=steps_per_epoch,
                                     enabled=self.is_main, bar=config.run.progress)
    at = lambda d: durations.steps(d, steps_per_epoch=steps_per_epoch, batch_size=config.data.batch_size)
    self.every = {"log": at(config.run.log_every), "eval": at(config.evaluation.every),
                  "checkpoint": at(config.run.checkpoint_every) if config.run.checkpoint_every else 0}

  def save(self, metrics=None):
    self.checkpointer.save(self.state, data_state=self.iterator.get_state(), config=self.config.to_dict(),
                           metrics=metrics)

  def evaluate_and_save(self):
    """Evaluates (when there is eval data) and checkpoints with the metrics."""
    metrics = None
    if self.eval_ld is not None:
      metrics = run_eval(self.state, self.eval_ld, self.eval_fn, self.mesh,
                         max_in_flight=self.config.run.max_steps_in_flight)
      metrics["epoch"] = self.step / self.steps_per_epoch
      self.logger.scalars(self.step, metrics, split="eval")
      self.progress.eval(self.step, metrics)
      self.last_eval = metrics
      self.timer.restart()
      self.state = self.watch.observe_plateau(self.state, metrics, self.mesh)  # saved with the state
    self.save({k: v for k, v in metrics.items() if k in ("loss", "top1", "top5")} if metrics else None)
    return self.watch.after_eval(self.step, self.steps_per_epoch, metrics, self.state) if metrics else None

  def _bn_after(self) -> bool:
    """With BatchNorm re-estimation the last evaluation and checkpoint come after it."""
    return bool(self.config.evaluation.bn_recompute and self.state.batch_stats)

  def restore_best(self):
    """The best checkpoint's weights (by ``evaluation.best_metric``) become the run's final state."""
    best = self.checkpointer.best_step()
    if best is None or best == self.step:
      self.last_eval = self.last_eval or self.watch.record_at(self.step)
      return
    self.checkpointer.wait()
    self.state = self.checkpointer.restore(self.state, step=best)[0]
    self.last_eval = self.watch.record_at(best)
    print(f"early stopping at step {self.step}: restored the best checkpoint, step {best}")

  def finished_cleanly(self) -> bool:
    return self.step == self.total_steps and self.step > self.start_step and self.stopped_by is None

  def recompute_bn(self, train_ld, augment_fn, *, freeze, features):
    """Precise BatchNorm over ``evaluation.bn_recompute``, then the final evaluation and checkpoint."""
    config = self.config
    images = durations.examples(config.evaluation.bn_recompute, steps_per_epoch=self.steps_per_epoch,
                                batch_size=config.data.batch_size)
    self.state = recompute_batch_stats(
        self.state, first_batches(train_ld, images, config.data.batch_size), self.mesh,
        augment_fn=augment_fn, mean=None if features else config.data.mean,
        std=None if features else config.data.std, freeze=freeze)
    self.bn_recomputed = images
    self.evaluate_and_save()

  def _drain_and_watch(self, pending, signals, step) -> bool:
    """Waits for the pending steps, shows progress; True if the run is asked to stop."""
    _drain(pending, self.running, step, self.timer, self.checkpointer.latest_step())
    self.progress.show(step, self.running.last, self.timer.rate())  # bar on a terminal, else lines
    return _any_process(bool(signals)) if jax.process_count() > 1 else bool(signals)

  def loop(self, augment_fn, train_ld):
    """Steps until ``total_steps`` or a stop signal; evaluates and saves on the way."""
    config, pcount, pending, every = self.config, jax.process_count(), [], self.every
    with _stop_signals() as signals:
      if self.start_step == 0 and augment_fn is not None and self.is_main:
        _log_augmented_grid(self.logger, augment_fn, train_ld.iter_from(0), config)
      if pcount > 1:
        import orbax.checkpoint as ocp
        ocp.multihost.sync_global_processes("jcv_fit_start", timeout=600)
      self.stopped_by = self.watch.stopped_before()
      while self.step < self.total_steps and self.stopped_by is None:
        batch = next(self.iterator)
        batch = {"image": batch["image"], "label": batch["label"]}
        self.state, metrics = self.train_fn(self.state, parallel.shard_batch(batch, self.mesh))
        self.step += 1
        step, last = self.step, self.step == self.total_steps
        pending.append(metrics)
        epoch_end = step % self.steps_per_epoch == 0
        log_now = step % every["log"] == 0 or last
        ckpt_now = bool(every["checkpoint"]) and step % every["checkpoint"] == 0
        # Drain points are the same on every process; a stop request is only acted on there,
        # and agreed on by all processes (each may have received the signal at another step).
        stop = False
        if (len(pending) >= config.run.max_steps_in_flight or log_now or epoch_end or ckpt_now
                or (signals and pcount == 1)):
          stop = self._drain_and_watch(pending, signals, step)
        if log_now:
          self.logger.scalars(step, {**self.running.mean(), "img_per_s": self.timer.rate()}, split="train")
          self.running.reset()
        if last and self._bn_after() and not stop:
          break
        ended = None
        if self.eval_ld is not None and (step % every["eval"] == 0 or last):
          ended = self.evaluate_and_save()
        elif epoch_end or ckpt_now or stop or last:
          self.save()
        if stop:
          self.stopped_by = signal.Signals(signals[0]).name if signals else "SIGTERM"
          break
        if ended and not last:
          self.stopped_by = ended
          break

  def close(self, iterator, *, quiet: bool = False):
    """Ends the progress, the iterator, pending saves and the logs, trying each; the first error
    is raised after all of them, unless ``quiet`` (another error is already on its way out)."""
    errors = []
    for end in (self.progress.close, getattr(iterator, "close", None), self.checkpointer.wait,
                self.logger.flush, self.checkpointer.close):
      try:
        if end is not None:
          end()
      except Exception as e:  # noqa: BLE001 - raised below, after the others have run
        errors.append(e)
    if errors and not quiet:
      raise errors[0]

  def results(self, workdir, started) -> dict:
    """The results dict of the run (results.json)."""
    config, step = self.config, self.step
    device = jax.devices()[0]
    return {
        "final": {"train": self.running.last, "eval": self.last_eval},
        "best": best_eval(workdir / "metrics.jsonl", config.evaluation.best_metric) if self.is_main else None,
        "best_step": self.checkpointer.best_step(),
        "steps": step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
        "epochs": step / self.steps_per_epoch,
        "wall_time_s": time.time() - started,
        "train_img_per_s": self.timer.overall(),
        "devices": {"count": jax.device_count(), "local": jax.local_device_count(), "trained_on": self.mesh.devices.size,
                    "processes": jax.process_count(), "kind": device.device_kind, "platform": device.platform},
        "parallel": config.run.parallel,
        "compute_dtype": build.compute_dtype(config),
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
  import jaxlib
  import optax
  import orbax.checkpoint as ocp
  return {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "orbax-checkpoint": getattr(ocp, "__version__", "?"), "numpy": np.__version__}


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
      kept = (f"the last good checkpoint, step {saved_step}, is kept" if saved_step is not None
              else "no checkpoint had been saved yet")
      raise NonFiniteLossError(f"training loss is {float(m['loss'])} at step {first + i}; stopping ({kept}). "
                               "Lower the learning rate, add warmup or gradient clipping.")
    running.add(m)
  pending.clear()
  timer.mark(step)


def best_eval(jsonl_path, name):
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
  out, _ = jax.jit(augment_fn)(jax.random.key(config.run.seed), images, jnp.asarray(batch["label"][:32]))
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
