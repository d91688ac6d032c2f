"""The training loop: ``fit(config, workdir=...)`` and ``evaluate(workdir, ...)``.

fit builds data, model and state; resumes from the newest checkpoint in ``workdir``; runs
the compiled step over the device mesh with a bounded number of steps in flight; evaluates
and checkpoints every epoch (and every ``checkpoint_every`` steps); writes TensorBoard,
metrics.jsonl, config.json, class_names.json, results.json and figures.
"""
from __future__ import annotations

import contextlib
import functools
import pathlib
import platform
import signal
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jcv.train import checkpoint as ckpt_lib
from jcv.train import log as log_lib
from jcv.train import parallel, rundir, step as step_lib
from jcv.train.config import Config
from jcv.train.optim import make_optimizer, muon_mask
from jcv.train.state import create_train_state

__all__ = [
    "NonFiniteLossError", "fit", "evaluate", "load_run", "run_eval", "collect_logits",
    "enable_compilation_cache", "build_model", "build_augment", "source_spec", "eval_view",
    "recompute_batch_stats",
]


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN/inf; the message names the step."""


# ------------------------------------------------------------------ building blocks


def enable_compilation_cache(config: Config, workdir) -> str | None:
  """Turns on JAX's persistent compilation cache ("auto": the user's cache directory,
  :func:`jcv.perf.compilation_cache_dir`, never next to the workdir)."""
  where = config.compilation_cache
  if not where:
    return None
  if jax.config.jax_compilation_cache_dir:  # already chosen by the user or an earlier run
    return jax.config.jax_compilation_cache_dir
  from jcv import perf
  return perf.enable_compilation_cache(None if where == "auto" else where, min_compile_time_s=0.5)


def source_spec(config: Config, split: str):
  """What to hand ``jcv.data.sources.resolve``: ``data_dir`` itself when it is an image
  folder holding ``split`` (``--data-dir ../shared/data/cifar10``), else ``config.dataset``."""
  if config.data_dir:
    base = split.split("[", 1)[0]
    if (pathlib.Path(config.data_dir) / base).is_dir() or (
        config.val_fraction and (pathlib.Path(config.data_dir) / "train").is_dir()):
      return config.data_dir
  return config.dataset


def _source(config: Config, split: str):
  from jcv.data import sources
  return sources.resolve(source_spec(config, split), split=split, data_dir=config.data_dir,
                         val_fraction=config.val_fraction, seed=config.seed, **config.source_options)


def build_model(config: Config, num_classes: int):
  """``jcv.models.create(config.model, ...)`` with the config's dtype and model options."""
  import jcv.models
  options = dict(config.model_options)
  if config.dtype != "float32":
    options["dtype"] = jnp.dtype(config.dtype)
  return jcv.models.create(config.model, num_classes=num_classes, **options)


def build_augment(config: Config, num_classes: int):
  """The on-device augmentation ``fn(key, images_uint8, labels) -> (float [0, 1], soft labels)``."""
  try:
    from jcv.data.augment import make_augment
  except ImportError:
    if config.augment:
      warnings.warn("jcv.data.augment is not available; training without on-device augmentation")
    return None
  return make_augment(list(config.augment), num_classes=num_classes)


def _train_fn(config: Config, *, num_classes, augment_fn, schedule):
  l2 = config.weight_decay if config.weight_decay_mode == "l2" else 0.0
  return functools.partial(
      step_lib.train_step, augment_fn=augment_fn, num_classes=num_classes, mean=config.mean,
      std=config.std, label_smoothing=config.label_smoothing, l2_weight=l2,
      decay_bn_and_bias=config.decay_bn_and_bias, freeze=tuple(config.freeze), schedule=schedule,
      sync_batch_stats=config.sync_batch_stats,
      l2_exclude=(lambda p: muon_mask(p, config)) if config.optimizer == "muon" else None)


def eval_view(config: Config) -> dict:
  """The evaluation view of a run: ``{"image_size", "crop_fraction"}`` for eval loaders."""
  return {"image_size": config.eval_image_size or config.image_size,
          "crop_fraction": config.eval_crop_fraction}


def _eval_fn(config: Config):
  return functools.partial(step_lib.eval_step, mean=config.mean, std=config.std,
                           tta_flip=config.tta_flip, tta_translate=config.tta_translate)


def recompute_batch_stats(state, batches, mesh, *, augment_fn=None, mean=None, std=None, freeze=()):
  """Precise BatchNorm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021).

  Returns ``state`` whose BatchNorm running statistics are replaced by plain averages, over
  ``batches`` (host dicts with "image" and "label", global batches of equal size), of the
  statistics each batch gets in train mode with the training augmentation. The running
  averages training leaves behind weight the last few batches most (momentum 0.6 at batch 128
  is ~300 images); this uses as many as given. Works for any Flax model whose BatchNorm layers
  update ``momentum * old + (1 - momentum) * batch``: each layer's momentum is read off one
  batch run with running statistics of 0 and of 1. Layers matching ``freeze`` keep theirs.
  """
  if not state.batch_stats:
    return state
  fn = jax.jit(functools.partial(step_lib.bn_update, augment_fn=augment_fn, mean=mean, std=std))
  zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
  total, count, momentum = None, 0, None
  for index, batch in enumerate(batches):
    batch = parallel.shard_batch({"image": batch["image"], "label": batch["label"]}, mesh)
    scaled = fn(state, batch, zeros, index)  # (1 - momentum) * this batch's statistics
    if momentum is None:
      ones = jax.tree.map(jnp.ones_like, state.batch_stats)
      momentum = jax.tree.map(lambda a, b: jnp.mean(a - b), fn(state, batch, ones, index), scaled)
    total = scaled if total is None else jax.tree.map(jnp.add, total, scaled)
    count += 1
  if not count:
    raise ValueError("recompute_batch_stats needs at least one batch")
  new = jax.tree.map(lambda t, m, old: jnp.where(1 - m > 1e-6, t / (count * (1 - m)), old),
                     total, momentum, state.batch_stats)
  new = step_lib._keep_frozen_stats(new, state.batch_stats, tuple(freeze))
  return state.replace(batch_stats=new)


def run_eval(state, loader, eval_fn, mesh, *, max_in_flight: int = 16) -> dict:
  """Sums compiled ``eval_fn`` over one pass of ``loader`` -> {loss, top1, top5, n}."""
  pending, totals = [], {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}
  def drain():
    for sums in parallel.fetch(pending):
      for k in totals:
        totals[k] += float(sums[k])
    pending.clear()
  for batch in loader:
    batch = {"image": batch["image"], "label": batch["label"], "mask": batch["mask"]}
    pending.append(eval_fn(state, parallel.shard_batch(batch, mesh)))
    if len(pending) >= max_in_flight:
      drain()
  drain()
  n = totals.pop("count")
  out = {k: v / max(n, 1.0) for k, v in totals.items()}
  out["n"] = int(round(n))
  return out


def collect_logits(state, loader, config: Config, mesh):
  """(logits [N, C], labels [N], dataset indices [N]) over one pass of an eval loader (one process)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = jax.jit(functools.partial(step_lib.predict_logits, mean=config.mean, std=config.std,
                                 tta_flip=config.tta_flip, tta_translate=config.tta_translate),
               out_shardings=replicated)
  logits, labels, index = [], [], []
  for b, batch in enumerate(loader):
    out = parallel.fetch(fn(state, parallel.shard_batch({"image": batch["image"]}, mesh)["image"]))
    keep = np.asarray(batch["mask"], bool)
    logits.append(out[keep])
    labels.append(np.asarray(batch["label"])[keep])
    index.append(np.asarray(loader.batch_indices(b))[keep])
  return np.concatenate(logits), np.concatenate(labels), np.concatenate(index)


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


# ------------------------------------------------------------------ fit


@rundir.owns_workdir  # locks the workdir for the call; restart=True moves an old run aside
def fit(config: Config, *, workdir, train_source=None, eval_source=None, model=None,
        augment_fn="auto", resume: bool = True) -> dict:
  """Trains per ``config`` in ``workdir`` and returns the results dict (also results.json).

  Re-running with the same ``workdir`` resumes from its newest complete checkpoint,
  bitwise-identically to an uninterrupted run. Sources, model and augmentation can be passed
  in instead of being built from the config. Raises NonFiniteLossError naming the step if
  the loss becomes NaN/inf (the last good checkpoint stays). SIGINT/SIGTERM save a checkpoint
  and return early with ``results["stopped_by"]`` set.
  """
  config = config.validate()
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  enable_compilation_cache(config, workdir)
  started = time.time()
  is_main = jax.process_index() == 0
  pcount = jax.process_count()
  mesh = parallel.make_mesh()
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size {config.batch_size} must be divisible by the {jax.device_count()} devices")
  per_process = config.batch_size // pcount

  from jcv.data import pipeline
  train_src = train_source if train_source is not None else _source(config, config.train_split)
  if eval_source is None and config.eval_split:
    eval_src = _source(config, config.eval_split)
  else:
    eval_src = eval_source
  class_names = list(getattr(train_src, "class_names", []) or [])
  num_classes = config.num_classes or len(class_names)
  if not num_classes:
    raise ValueError("num_classes is unknown: the source has no class_names; set config.num_classes")
  if num_classes < 2:
    raise ValueError(f"the training data has {num_classes} class ({class_names}): a classifier needs "
                     "at least 2; check --data-dir (one sub-folder per class)")
  train_ld = pipeline.train_loader(train_src, batch_size=per_process, image_size=config.image_size,
                                   seed=config.seed, crop=config.crop, scale=tuple(config.crop_scale),
                                   flip={"none": False, "random": True}.get(config.host_flip, config.host_flip),
                                   num_workers=config.num_workers)
  steps_per_epoch = train_ld.steps_per_epoch
  total_steps = config.steps or config.epochs * steps_per_epoch
  eval_bs = (config.eval_batch_size or config.batch_size) // pcount
  eval_ld = (pipeline.eval_loader(eval_src, batch_size=eval_bs, num_workers=config.num_workers,
                                  **eval_view(config)) if eval_src is not None else None)

  model = model if model is not None else build_model(config, num_classes)
  if isinstance(augment_fn, str) and augment_fn == "auto":
    augment_fn = build_augment(config, num_classes)
  tx, schedule = make_optimizer(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  state = create_train_state(jax.random.key(config.seed), model, tx,
                             (1, config.image_size, config.image_size, 3))
  state = parallel.replicate(state, mesh)
  checkpointer = ckpt_lib.RunCheckpointer(
      workdir / "checkpoints", keep=config.keep_checkpoints, best_metric=config.best_metric,
      best_mode="min" if config.best_metric == "loss" else "max")
  iterator = train_ld.iter_from(0)
  # A run's checkpoints are resumed only by the same run (rundir.resume refuses others).
  restored = rundir.resume(checkpointer, state, workdir=workdir, is_main=is_main, current=rundir.describe(
      config, class_names=class_names, num_classes=num_classes, total_steps=total_steps,
      steps_per_epoch=steps_per_epoch, state=state)) if resume else None
  if restored is not None:
    state, data_state, _, _ = restored
    iterator.set_state(data_state)
  start_step = int(parallel.fetch(state.step))
  if is_main:
    log_lib.write_json(workdir / "config.json", config.to_dict())
    log_lib.write_json(workdir / "class_names.json", class_names)
  logger = log_lib.MetricLogger(workdir, enabled=is_main)
  train_fn = parallel.compile_train_step(
      _train_fn(config, num_classes=num_classes, augment_fn=augment_fn, schedule=schedule),
      mesh, mode=config.parallel)
  eval_fn = parallel.compile_eval_step(_eval_fn(config), mesh, mode=config.parallel)
  # Compile ahead of time, so that no process enters the first collective while another
  # is still compiling (CPU gloo connections time out after ~30 s).
  image_shape = (config.image_size, config.image_size, 3)
  train_fn = train_fn.lower(state, parallel.batch_spec(mesh, config.batch_size, image_shape)).compile()
  if eval_ld is not None:
    eval_size = eval_view(config)["image_size"]
    eval_fn = eval_fn.lower(state, parallel.batch_spec(mesh, eval_bs * pcount, (eval_size, eval_size, 3),
                                                       mask=True)).compile()

  def save(metrics=None):
    checkpointer.save(state, data_state=iterator.get_state(), config=config.to_dict(), metrics=metrics)

  last_eval, stopped_by, bn_recomputed = None, None, None
  running = _Running()
  progress = log_lib.Progress(total=total_steps, start=start_step, steps_per_epoch=steps_per_epoch,
                              enabled=is_main, bar=config.progress)
  pending: list = []
  timer = _Throughput(config.batch_size)
  step = start_step
  try:
    with _stop_signals() as signals:
      if start_step == 0 and augment_fn is not None and is_main:
        _log_augmented_grid(logger, augment_fn, train_ld.iter_from(0), config)
      if pcount > 1:
        import orbax.checkpoint as ocp
        ocp.multihost.sync_global_processes("jcv_fit_start", timeout=600)
      while step < total_steps:
        batch = next(iterator)
        batch = {"image": batch["image"], "label": batch["label"]}
        state, metrics = train_fn(state, parallel.shard_batch(batch, mesh))
        step += 1
        pending.append(metrics)
        epoch_end = step % steps_per_epoch == 0
        log_now = step % config.log_every == 0 or step == total_steps
        ckpt_now = bool(config.checkpoint_every) and step % config.checkpoint_every == 0
        # Drain points are the same on every process; a stop request is only acted on there,
        # and agreed on by all processes (each may have received the signal at another step).
        drain_now = (len(pending) >= config.max_steps_in_flight or log_now or epoch_end or ckpt_now
                     or step == total_steps or (signals and pcount == 1))
        stop = False
        if drain_now:
          _drain(pending, running, step, timer)
          progress.show(step, running.last, timer.rate())  # bar on a terminal, else lines
          stop = _any_process(bool(signals)) if pcount > 1 else bool(signals)
        if log_now:
          logger.scalars(step, {**running.mean(), "img_per_s": timer.rate()}, split="train")
          running.reset()
        if step == total_steps and config.bn_recompute_images and state.batch_stats:
          state = recompute_batch_stats(
              state, _first_batches(train_ld, config.bn_recompute_images, config.batch_size), mesh,
              augment_fn=augment_fn, mean=config.mean, std=config.std, freeze=config.freeze)
          bn_recomputed = config.bn_recompute_images
        eval_metrics = None
        if eval_ld is not None and ((epoch_end and (step // steps_per_epoch) % config.eval_every == 0)
                                    or step == total_steps):
          eval_metrics = run_eval(state, eval_ld, eval_fn, mesh, max_in_flight=config.max_steps_in_flight)
          eval_metrics["epoch"] = step / steps_per_epoch
          logger.scalars(step, eval_metrics, split="eval")
          progress.eval(step, eval_metrics)
          last_eval = eval_metrics
          timer.restart()
        if eval_metrics is not None or epoch_end or ckpt_now or stop or step == total_steps:
          save({k: v for k, v in eval_metrics.items() if k in ("loss", "top1", "top5")}
               if eval_metrics is not None else None)
        if stop:
          stopped_by = signal.Signals(signals[0]).name if signals else "SIGTERM"
          break
  finally:
    progress.close()
    if hasattr(iterator, "close"):
      iterator.close()
    checkpointer.wait()
    logger.flush()
  checkpointer.close()
  if last_eval is None and eval_ld is not None and step >= total_steps:  # re-run of a finished run
    last_eval = run_eval(state, eval_ld, eval_fn, mesh, max_in_flight=config.max_steps_in_flight)
    last_eval["epoch"] = step / steps_per_epoch

  results = {
      "final": {"train": running.last, "eval": last_eval},
      "best": _best_eval(workdir / "metrics.jsonl", config.best_metric) if is_main else None,
      "best_step": checkpointer.best_step(),
      "steps": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
      "epochs": step / steps_per_epoch,
      "wall_time_s": time.time() - started,
      "train_img_per_s": timer.overall(),
      "devices": {"count": jax.device_count(), "local": jax.local_device_count(),
                  "processes": pcount, "kind": jax.devices()[0].device_kind,
                  "platform": jax.devices()[0].platform},
      "parallel": config.parallel,
      "versions": _versions(),
      "resumed_from_step": start_step or None,
      "stopped_by": stopped_by,
      "bn_recomputed_images": bn_recomputed,
  }
  if is_main:
    log_lib.write_json(workdir / "results.json", results)
    logger.hparams(config.to_dict(), {k: v for k, v in (last_eval or {}).items() if k != "n"})
    if config.plots and stopped_by is None:
      _plots(workdir, state, eval_ld, config, mesh, class_names, eval_src)
  logger.close()
  return results


# ------------------------------------------------------------------ helpers of fit


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
  """The first ceil(num_images / global_batch) batches of the loader's first epoch."""
  iterator = loader.iter_from(0)
  try:
    for _ in range(min(-(-num_images // global_batch), loader.steps_per_epoch)):
      yield next(iterator)
  finally:
    if hasattr(iterator, "close"):
      iterator.close()


def _any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is True on any of them (a small collective)."""
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _drain(pending, running, step, timer):
  """Waits for the pending steps' metrics (bounding steps in flight) and checks the loss."""
  host = parallel.fetch(pending)
  first = step - len(pending) + 1
  for i, m in enumerate(host):
    if not np.isfinite(m["loss"]):
      pending.clear()
      raise NonFiniteLossError(
          f"training loss is {float(m['loss'])} at step {first + i}; stopping (the last good "
          "checkpoint is kept). Lower the learning rate, add warmup or gradient clipping.")
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


def _plots(workdir, state, eval_ld, config, mesh, class_names, eval_src):
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


# ------------------------------------------------------------------ evaluate a saved run


def load_run(workdir, *, which: str = "best"):
  """(config, class_names, state, mesh) of a run's ``best`` or ``latest`` checkpoint."""
  import json
  workdir = pathlib.Path(workdir)
  if not (workdir / "checkpoints").is_dir():
    raise ValueError(f"{workdir} has no checkpoints/ folder; expected the --workdir of a training run")
  checkpointer = ckpt_lib.RunCheckpointer(workdir / "checkpoints")
  step = checkpointer.best_step() if which == "best" else checkpointer.latest_step()
  if step is None:
    raise ValueError(f"no complete checkpoint in {workdir / 'checkpoints'}")
  config = Config.from_dict(checkpointer.restore_config(step=step))
  names_file = workdir / "class_names.json"
  class_names = json.loads(names_file.read_text()) if names_file.exists() else []
  num_classes = config.num_classes or len(class_names)
  model = build_model(config, num_classes)
  tx, _ = make_optimizer(config, steps_per_epoch=1, total_steps=1)
  state = create_train_state(jax.random.key(0), model, tx, (1, config.image_size, config.image_size, 3))
  mesh = parallel.make_mesh()
  state = parallel.replicate(state, mesh)
  state = checkpointer.restore(state, step=step)[0]
  checkpointer.close()
  return config, class_names, state, mesh


def evaluate(workdir, *, data_dir=None, split: str = "test", which: str = "best",
             batch_size: int | None = None, source=None) -> dict:
  """Evaluates a run's checkpoint on ``split`` of its dataset (or ``data_dir``) -> {top1, top5, loss, n}.

  The data's class names must be the run's (class_names.json), or a subset mapped by name;
  other classes raise ValueError."""
  from jcv.data import pipeline
  from jcv.train.classmap import align_classes
  config, class_names, state, mesh = load_run(workdir, which=which)
  if data_dir is not None:
    config = config.replace(data_dir=str(data_dir))
  src = source if source is not None else _source(config, split)
  src = align_classes(src, class_names, what=f"split {split!r}")  # by name; refuses unknown classes
  bs = batch_size or config.eval_batch_size or config.batch_size
  bs = max(jax.device_count(), bs - bs % jax.device_count()) // jax.process_count()
  loader = pipeline.eval_loader(src, batch_size=bs, **eval_view(config))
  eval_fn = parallel.compile_eval_step(_eval_fn(config), mesh, mode="jit")
  out = run_eval(state, loader, eval_fn, mesh)
  if not np.isfinite(out["loss"]):
    warnings.warn(f"the checkpoint's logits are NaN/inf on some of the {out['n']} examples: the loss is "
                  f"{out['loss']}, and those examples count as misses")
  return {"top1": out["top1"], "top5": out["top5"], "loss": out["loss"], "n": out["n"]}
