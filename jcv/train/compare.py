"""Runs trained alike, side by side: the lecture's architectures from scratch on the same data,
input size, augmentation and training time (experiments/architectures.py), and a backbone's
scratch / frozen / fine-tuned regimes at the same epochs or time (experiments/cats_vs_dogs.py
``--variant like_for_like``).

Each run trains in ``WORKDIR/<name>`` and is tested there (:func:`jcv.train.report.fit_and_test`),
leaving its row in ``result.json``: an interrupted table resumes with the runs it lacks, and a
run whose loss became NaN/inf keeps a row that says so. ``WORKDIR/comparison.{md,json,png}``
hold the table and its figure.
"""
from __future__ import annotations

import json
import pathlib
import time

from jcv.train import budget, build, log as log_lib, report
from jcv.train.config import Config
from jcv.train.sections import Init, Pretrained

__all__ = ["LECTURE_MODELS", "SLOW_BN_FAMILIES", "ARCHITECTURE_COLUMNS", "REGIME_COLUMNS", "accepts",
           "smallest_common_size", "model_config", "regime_configs", "model_costs", "within_minutes", "train_one",
           "shared_sources", "train_all", "compare_models", "compare_regimes"]

# Every family of the "advanced CNN architectures" lecture, in its order, and the course's CIFAR nets.
LECTURE_MODELS = ("alexnet", "zfnet", "vgg11", "vgg11_bn", "vgg16", "vgg16_bn", "spp_net", "googlenet", "inception_v3",
                  "resnet18", "resnet50", "inception_resnet_v2", "mobilenet_v1", "mobilenet_v2", "efficientnet_lite0",
                  "cifar_cnn", "textbook_cnn")
# Keras' BatchNorm momentum (0.99-0.999) leaves the running statistics near their start after a few
# hundred steps from a random init; these families get the 0.9 every other family uses.
SLOW_BN_FAMILIES = ("inception_resnet_v2", "mobilenet_v1", "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                    "efficientnet_lite2", "efficientnet_lite3", "efficientnet_lite4")
ARCHITECTURE_COLUMNS = {"run": "model", "params": "params", "gflops_per_image": "GFLOPs/image (fwd)",
                        "train_img_per_s": "train img/s", "steps": "steps", "epochs": "epochs",
                        "wall_time_s": "wall time (s)", "best_val_top1": "best val top-1", "test_top1": "test top-1",
                        "status": "status"}
REGIME_COLUMNS = {"run": "regime", "image_size": "image size", "steps": "steps", "epochs": "epochs",
                  "train_img_per_s": "train img/s", "wall_time_s": "wall time (s)", "best_val_top1": "best val top-1",
                  "test_top1": "test top-1", "status": "status"}


def accepts(name: str, size: int, **options) -> bool:
  """Whether model ``name`` runs on ``size`` x ``size`` images: one ``jax.eval_shape`` of its
  init (shapes only, nothing computed)."""
  import jax
  import jax.numpy as jnp

  import jcv.models
  model = jcv.models.create(name, num_classes=10, **options)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  try:
    jax.eval_shape(lambda x: model.init(rngs, x, train=False), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  except (ValueError, TypeError, ZeroDivisionError):  # a map shrank below a kernel, or a model's own check
    return False
  return True


def smallest_common_size(names, *, start: int = 16, stop: int = 512) -> int:
  """The smallest input size (pixels, from ``start``) that every model of ``names`` accepts."""
  size, settled = start, False
  while not settled:
    settled = True
    for name in names:
      while not accepts(name, size):
        size, settled = size + 1, False
        if size > stop:
          raise ValueError(f"{name} accepts no input size in [{start}, {stop}]")
  return size


def model_config(base: Config, name: str) -> Config:
  """``base`` training model ``name`` (a registered family); the families of
  :data:`SLOW_BN_FAMILIES` get BatchNorm momentum 0.9 unless ``base.model.options`` sets one."""
  import jcv.models
  if name not in jcv.models.list_models():
    raise ValueError(f"unknown model {name!r} in --models; available: {', '.join(jcv.models.list_models())}")
  options = {"bn_momentum": 0.9} if name in SLOW_BN_FAMILIES else {}
  return base.replace(model={"name": name, "options": {**options, **base.model.options}})


def regime_configs(base: Config, weights: str) -> dict[str, Config]:
  """``{"scratch", "frozen", "finetune"}`` of ``base``'s model, identical (data, size, augmentation,
  optimizer, length) but for where the weights start and what trains: ``scratch`` a random init,
  every layer; ``frozen`` the ImageNet ``weights``, the head alone (BatchNorm in inference mode);
  ``finetune`` the same weights, every stage at 0.3x the head's rate (BatchNorm in inference mode)."""
  pretrained = Pretrained(weights)
  return {"scratch": base.replace(init=Init()),
          "frozen": base.replace(init=Init(pretrained=pretrained, trainable="head")),
          "finetune": base.replace(init=Init(pretrained=pretrained, trainable="backbone", backbone_lr_multiplier=0.3))}


def model_costs(config: Config, num_classes: int) -> dict:
  """``{"params", "gflops_per_image"}`` of the config's model at its input size: trainable
  parameters and XLA's forward FLOPs per image (jcv.models.measure_macs; nothing compiled)."""
  import jcv.models
  name, size, options = config.model.name, config.data.image_size, dict(config.model.options)
  params = jcv.models.count_params(name, input_size=size, num_classes=num_classes, **options)
  flops = jcv.models.measure_macs(name, input_size=size, num_classes=num_classes, **options)["flops"]
  return {"params": params, "gflops_per_image": flops / 1e9}


def within_minutes(config: Config, num_classes: int, minutes: float, *, evaluations: int | None = None,
                   warmup_fraction: float | None = None) -> Config:
  """``config`` lasting the steps that take ``minutes`` of training on this machine: its own
  compiled step timed on random batches (:func:`jcv.train.budget.step_seconds`); compilation and
  evaluations come on top. ``evaluations``: that many, evenly spread; ``warmup_fraction``: the
  warmup as that share of the steps (else both stay as configured). Logs at least 10 times."""
  if minutes <= 0:
    raise ValueError(f"the time budget must be > 0 minutes, got {minutes}")
  per_step, compile_s = budget.step_seconds(config, num_classes)
  steps = max(int(minutes * 60 / per_step), 1)
  print(f"{config.model.name}: {per_step:.3f} s per step (compiled in {compile_s:.0f} s): {steps} steps "
        f"in {minutes:g} min")
  # At least 10 log windows: the run's img/s leaves out the first (compiling) one.
  changes = {"run": {"length": f"{steps} steps", "log_every": f"{max(1, min(50, steps // 10))} steps"}}
  if evaluations:
    changes["evaluation"] = {"every": f"{max(steps // evaluations, 1)} steps"}
  if warmup_fraction is not None:
    changes["schedule"] = {"warmup": f"{round(steps * warmup_fraction)} steps"}
  return config.replace(**changes)


def train_one(config: Config, folder, *, sources: dict | None = None, extra: dict | None = None,
              restart: bool = False) -> dict:
  """Trains and tests ``config`` in ``folder`` -> its row (with ``extra``, ``steps``, ``status``),
  also in ``folder/result.json``. A NaN/inf loss gives a row with ``status`` "diverged (...)"."""
  from jcv.train.loop import NonFiniteLossError
  folder = pathlib.Path(folder)
  try:
    row = {**report.fit_and_test(config, folder, sources=sources, restart=restart), "status": "ok"}
  except NonFiniteLossError as e:
    print(f"{folder.name}: diverged: {e}")
    row = {"run": folder.name, "status": f"diverged ({str(e).split(';')[0]})", "image_size": config.data.image_size,
           "config": config.to_dict()}
    folder.mkdir(parents=True, exist_ok=True)
  row = {**row, **(extra or {})}
  log_lib.write_json(folder / "result.json", row)
  return row


def shared_sources(config: Config, sources: dict | None = None, *, test_images: int | None = None) -> dict:
  """The train, eval and test sources every run of a table uses, built once: those in ``sources``,
  else the config's splits; the test split cut to a seeded random ``test_images`` when given."""
  from jcv.data.subsets import subset
  sources = dict(sources or {})
  if sources.get("train") is None:
    sources["train"] = build.build_source(config, config.data.train_split)
  if sources.get("eval") is None and config.data.eval_split:
    sources["eval"] = build.build_source(config, config.data.eval_split)
  if sources.get("test") is None and test_images:
    test = build.build_source(config, report.test_split(config))
    sources["test"] = test if len(test) <= test_images else subset(test, test_images, seed=config.run.seed)
  return sources


def train_all(configs: dict, workdir, *, sources: dict | None = None, test_images: int | None = None,
              minutes: float | None = None, evaluations: int | None = None, warmup_fraction: float | None = None,
              costs: bool = False, force: bool = False, restart: bool = False) -> list[dict]:
  """Each ``{name: config}`` trained and tested in ``WORKDIR/<name>`` (:func:`train_one`) on
  :func:`shared_sources`, for ``minutes`` of training each when given (:func:`within_minutes`),
  with :func:`model_costs` in its row if ``costs`` -> the rows, in order. A run with a
  ``result.json`` is skipped; ``force`` trains it again (its old folder moved aside)."""
  workdir, rows, started = pathlib.Path(workdir), [], time.time()
  for i, (name, config) in enumerate(configs.items()):
    done = workdir / name / "result.json"
    if done.exists() and not force:
      print(f"{name}: already done ({done}); --force trains it again")
      rows.append(json.loads(done.read_text()))
      continue
    sources = shared_sources(config, sources, test_images=test_images)
    num_classes = config.model.num_classes or len(sources["train"].class_names)
    extra = model_costs(config, num_classes) if costs else {}
    if minutes:
      config = within_minutes(config, num_classes, minutes, evaluations=evaluations, warmup_fraction=warmup_fraction)
    rows.append(train_one(config, workdir / name, sources=sources, extra=extra,
                          restart=restart or (force and (workdir / name).exists())))
    print(f"[{i + 1}/{len(configs)}] {name}: {rows[-1]['status']}; {(time.time() - started) / 60:.1f} min so far")
  return rows


def _budget_note(minutes, rows: list[dict], config: Config) -> str:
  length = f"{minutes:g} min of training each (step time measured here)" if minutes else f"length {config.run.length}"
  tested = {r["test_n"] for r in rows if r.get("test_n")}
  test = f"; tested on {', '.join(f'{n:,}' for n in sorted(tested))} images of the test split" if tested else ""
  return f"{config.data.image_size} px, batch {config.data.batch_size}, {length}{test}."


def compare_models(configs: dict, workdir, *, minutes: float | None = None, test_images: int | None = None,
                   evaluations: int = 2, warmup_fraction: float = 0.05, force: bool = False,
                   restart: bool = False) -> str:
  """The architecture table: every ``{model: config}`` trained for ``minutes`` (or its own
  length), tested -> ``WORKDIR/comparison.{md,json}`` (:data:`ARCHITECTURE_COLUMNS`) and
  ``comparison.png`` (test top-1 against parameters and against training img/s)."""
  from jcv import plots
  rows = train_all(configs, workdir, test_images=test_images, minutes=minutes, evaluations=evaluations,
                   warmup_fraction=warmup_fraction, costs=True, force=force, restart=restart)
  first = next(iter(configs.values()))
  table = report.compare_runs(workdir, rows, columns=ARCHITECTURE_COLUMNS, curves=False,
                              title="architectures from scratch", note=_budget_note(minutes, rows, first))
  plots.accuracy_vs_cost(rows, pathlib.Path(workdir) / "comparison.png", title=f"from scratch, {first.data.image_size} "
                         f"px, {f'{minutes:g} min of training each' if minutes else first.run.length}")
  return table


def compare_regimes(configs: dict, workdir, *, minutes: float | None = None, sources: dict | None = None,
                    force: bool = False, restart: bool = False, title: str = "") -> list[str]:
  """The like-for-like transfer tables of :func:`regime_configs`: each trained for its own length
  in ``WORKDIR/same_epochs``, then, with ``minutes``, for that much training each in
  ``WORKDIR/same_time``; tested -> ``comparison.{md,json,png}`` in each (:data:`REGIME_COLUMNS`;
  the figure: the runs' validation curves) -> the markdown tables."""
  tables = []
  for mode, budget_minutes in (("epochs", None), ("time", minutes)):
    if mode == "time" and not minutes:
      break
    folder = pathlib.Path(workdir) / f"same_{mode}"
    rows = train_all(configs, folder, sources=sources, minutes=budget_minutes, force=force, restart=restart)
    tables.append(report.compare_runs(folder, rows, columns=REGIME_COLUMNS, title=f"{title}: the same {mode}",
                                      note=_budget_note(budget_minutes, rows, next(iter(configs.values())))))
  return tables
