"""Evaluating and using a run: metric passes over a loader, logits, a run folder's checkpoint.

A run folder (the ``workdir`` of :func:`jcv.train.fit`, any regime) holds ``checkpoints/``,
``config.json`` and ``class_names.json``; :func:`load_run` rebuilds its model from the config
alone, :func:`evaluate` and :func:`predict` use it.
"""
from __future__ import annotations

import functools
import json
import pathlib
import warnings

import jax
import numpy as np

from jcv.train import build, checkpoint as ckpt_lib, losses, parallel, step as step_lib
from jcv.train.config import Config
from jcv.train.state import create_train_state

__all__ = ["run_eval", "collect_logits", "load_run", "evaluate", "predict", "save_run", "test_metrics"]


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
  fn = jax.jit(functools.partial(step_lib.predict_logits, **build.tta_options(config)),
               out_shardings=replicated)
  logits, labels, index = [], [], []
  for b, batch in enumerate(loader):
    out = parallel.fetch(fn(state, parallel.shard_batch({"image": batch["image"]}, mesh)["image"]))
    keep = np.asarray(batch["mask"], bool)
    logits.append(out[keep])
    labels.append(np.asarray(batch["label"])[keep])
    index.append(np.asarray(loader.batch_indices(b))[keep])
  return np.concatenate(logits), np.concatenate(labels), np.concatenate(index)


def test_metrics(logits, labels, class_names=()) -> dict:
  """{"top1", "top5", "n", "per_class_top1": {name: top-1}} of logits [N, C] against labels [N]."""
  logits, labels = np.asarray(logits), np.asarray(labels)
  predictions = logits.argmax(-1)
  per_class = {name: float((predictions[labels == c] == c).mean())
               for c, name in enumerate(class_names) if (labels == c).any()}
  hits = lambda k: np.asarray(losses.topk_correct(logits, labels, k=min(k, logits.shape[-1])), np.float64)
  return {"top1": float(hits(1).mean()), "top5": float(hits(5).mean()),
          "n": int(len(labels)), "per_class_top1": per_class}


def _read_json(path, what: str):
  """The JSON in ``path``; a damaged file is a ValueError naming it."""
  try:
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} ({what}) is damaged: {e}; it is written by the training run") from None


def _phase_of(workdir: pathlib.Path) -> pathlib.Path | None:
  """The run folder of which ``workdir`` is a phase folder (``RUN/phases/<i>``), or None."""
  run = workdir.absolute().parent.parent
  return run if workdir.absolute().parent.name == "phases" and (run / "checkpoints").is_dir() else None


def _check_run_folder(workdir: pathlib.Path) -> None:
  if not (workdir / "checkpoints").is_dir():
    raise ValueError(f"{workdir} has no checkpoints/ folder; expected the --workdir of a training run")


def load_run(workdir, *, which: str = "best"):
  """(config, class_names, state, mesh) of a run's ``best`` or ``latest`` checkpoint.

  Reads only (the run may be live): a step that does not read gives way to the newest that
  does, with a warning."""
  workdir = pathlib.Path(workdir)
  _check_run_folder(workdir)
  names_file = workdir / "class_names.json"
  class_names = _read_json(names_file, "the run's class names") if names_file.exists() else []
  if not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
    raise ValueError(f"{names_file} (the run's class names) is damaged: expected a list of names")
  mesh = parallel.make_mesh()

  def make_state(config_dict):
    config = Config.from_dict(config_dict)
    model = build.build_model(config, config.model.num_classes or len(class_names))
    tx = build.checkpoint_optimizer(config, model)
    state = create_train_state(jax.random.key(0), model, tx, (1,) + build.example_shape(config))
    return parallel.replicate(state, mesh)

  checkpointer = ckpt_lib.RunCheckpointer(workdir / "checkpoints", read_only=True)
  try:
    state, config_dict, _ = checkpointer.read(make_state, which=which)
  except ValueError:
    run = _phase_of(workdir)
    if run is None:
      raise
    raise ValueError(f"{workdir} is phase {workdir.name} of the run {run}, whose checkpoints hold only "
                     f"the part that phase trained: use --workdir {run}") from None
  finally:
    checkpointer.close()
  return Config.from_dict(config_dict), class_names, state, mesh


def evaluate(workdir, *, data_dir=None, split: str = "test", which: str = "best",
             batch_size: int | None = None, source=None) -> dict:
  """Evaluates a run's checkpoint on ``split`` of its dataset (or ``data_dir``) -> {top1, top5, loss, n}.

  The data's class names must be the run's (class_names.json), or a subset mapped by name;
  other classes raise ValueError. The batch size is capped at the data's size."""
  from jcv.data import pipeline
  from jcv.train.classmap import align_classes
  config, class_names, state, mesh = load_run(workdir, which=which)
  if data_dir is not None:
    config = config.replace(data={"data_dir": str(data_dir)})
  src = source if source is not None else build.build_source(config, split)
  src = align_classes(src, class_names, what=f"split {split!r}")  # by name; refuses unknown classes
  if batch_size is not None and batch_size < 1:
    raise ValueError(f"--batch-size must be positive, got {batch_size}")
  bs = min(batch_size or config.evaluation.batch_size or config.data.batch_size, max(len(src), 1))
  bs = max(jax.device_count(), bs - bs % jax.device_count()) // jax.process_count()
  loader = pipeline.eval_loader(src, batch_size=bs, **build.eval_view(config))
  fn = parallel.compile_eval_step(build.eval_fn(config), mesh, mode="jit")
  out = run_eval(state, loader, fn, mesh)
  if not np.isfinite(out["loss"]):
    warnings.warn(f"the checkpoint's logits are NaN/inf on some of the {out['n']} examples: the loss is "
                  f"{out['loss']}, and those examples count as misses")
  return {"top1": out["top1"], "top5": out["top5"], "loss": out["loss"], "n": out["n"]}


def _decode_views(files, image_size: int, crop_fraction: float):
  """(images [M, S, S, 3] of the files that decode, their files, {file: reason} of the others)."""
  from jcv.data import decode, transforms
  images, good, bad = [], [], {}
  for f in files:
    try:
      images.append(transforms.eval_resize_crop(decode.decode_image(f), image_size,
                                                crop_fraction=crop_fraction))
      good.append(f)
    except decode.CorruptImageError as e:
      bad[str(f)] = e.reason
  return images, good, bad


def predict(workdir, files, *, top_k: int = 5, which: str = "best") -> list[dict]:
  """Top-k (class name, probability) for each image file, from a run's checkpoint.

  A file that does not decode gets ``{"file", "error"}`` (and a warning); the others are predicted."""
  from jcv.data import decode
  decode.require_files(files)
  config, class_names, state, _ = load_run(workdir, which=which)
  view = build.eval_view(config)
  images, good, bad = _decode_views(files, view["image_size"], view["crop_fraction"])
  for f, reason in bad.items():
    warnings.warn(f"cannot predict {f}: {reason}")
  if not images:
    raise ValueError(f"none of the {len(files)} image file(s) could be decoded")
  logits = jax.jit(lambda s, x: step_lib.predict_logits(s, x, **build.tta_options(config)))(state, np.stack(images))
  probs = dict(zip(map(str, good), np.asarray(jax.nn.softmax(logits, axis=-1))))
  out = []
  for f in map(str, files):
    if f in bad:
      out.append({"file": f, "error": bad[f]})
      continue
    top = np.argsort(-probs[f])[:top_k]
    out.append({"file": f, "top": [[class_names[i] if class_names else int(i), float(probs[f][i])] for i in top]})
  return out


def save_run(workdir, config: Config, model, variables: dict, *, class_names, metrics=None,
             step: int = 1) -> None:
  """Saves whole-model ``variables`` as a run folder (Orbax checkpoint, config, class names)
  that :func:`load_run`, ``evaluate`` and ``predict`` accept. ``config.model.name`` and
  ``config.model.options`` must rebuild ``model``."""
  import jax.numpy as jnp
  from jcv.train.state import TrainState, raw_key
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  tx = build.checkpoint_optimizer(config, model)
  params = jax.tree.map(jnp.asarray, variables["params"])
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                     batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats", {})),
                     opt_state=tx.init(params), key=raw_key(jax.random.key(config.run.seed)),
                     apply_fn=model.apply, tx=tx)
  saver = ckpt_lib.RunCheckpointer(workdir / "checkpoints", best_metric=config.evaluation.best_metric)
  saver.save(state, config=config.to_dict(),
             metrics=None if metrics is None else {k: float(v) for k, v in metrics.items()
                                                   if k in ("loss", "top1", "top5")})
  saver.close()
  from jcv.train import log as log_lib
  log_lib.write_json(workdir / "config.json", config.to_dict())
  log_lib.write_json(workdir / "class_names.json", list(class_names))
