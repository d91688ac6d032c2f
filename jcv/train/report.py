"""Reports on finished runs: a test-split report of one run, and a table + figure comparing runs.

``test_report(workdir, split=...)``: top-1/top-5 and per-class accuracy of a run's checkpoint on
a split, a confusion matrix and a grid of predictions, merged into ``WORKDIR/results.json``.
``compare_runs(workdir, rows)``: ``WORKDIR/comparison.{md,json,png}`` from one row per run.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform

import numpy as np

from jcv import safefile
from jcv.train import build, evaluation, log as log_lib

__all__ = ["test_split", "test_report", "fit_and_test", "subset_sources", "compare_runs", "read_rows", "machine"]


def machine() -> str:
  """The machine a measurement ran on, in words (cores, load)."""
  return f"{platform.machine()}, {os.cpu_count()} CPU cores, load {os.getloadavg()[0]:.1f}"


def test_split(config) -> str:
  """The test split of a run's data: an image folder's ``test``, else tfds' ``test`` split name
  used by the experiments (``validation`` for food101, ``train[80%:]`` for cats_vs_dogs)."""
  if build.is_image_folder(config.data.data_dir or config.data.dataset, "test"):
    return "test"
  return {"food101": "validation", "cats_vs_dogs": "train[80%:]"}.get(config.data.dataset, "test")


def test_report(workdir, *, split: str | None = None, fit_results: dict | None = None, source=None,
                which: str = "latest", grid: int = 16) -> dict:
  """Test metrics of a run folder (per class too), confusion.png and predictions.png ->
  ``WORKDIR/results.json`` (the fit results under ``"fit"``); prints a short summary."""
  from jcv import plots
  from jcv.data import pipeline, transforms
  workdir = pathlib.Path(workdir)
  config, class_names, state, mesh = evaluation.load_run(workdir, which=which)
  split = split or test_split(config)
  test = source if source is not None else build.build_source(config, split)
  view = build.eval_view(config)
  loader = pipeline.eval_loader(test, batch_size=config.evaluation.batch_size or config.data.batch_size, **view)
  logits, labels, _ = evaluation.collect_logits(state, loader, config, mesh)
  fit_results = fit_results or {}
  results = {**evaluation.test_metrics(logits, labels, class_names), "split": split,
             "val": (fit_results.get("final") or {}).get("eval"), "wall_time_s": fit_results.get("wall_time_s"),
             "phases": fit_results.get("phases"), "config": config.to_dict(), "machine": machine()}
  log_lib.write_json(workdir / "results.json", results)
  predictions = logits.argmax(-1)
  plots.confusion_matrix(labels, predictions, class_names, workdir / "confusion.png")
  pick = np.random.default_rng(config.run.seed).permutation(len(labels))[:grid]
  images = [transforms.eval_resize_crop(test[int(i)]["image"], view["image_size"], crop_fraction=view["crop_fraction"])
            for i in pick]
  plots.prediction_grid(images, labels[pick], predictions[pick], class_names, workdir / "predictions.png")
  print(f"test top-1 {results['top1']:.4f}, top-5 {results['top5']:.4f} on {results['n']} images ({split})")
  for name, acc in results["per_class_top1"].items():
    print(f"  {name:>16s}: {acc:.3f}")
  return results


def fit_and_test(config, folder, *, sources: dict | None = None, restart: bool = False) -> dict:
  """Trains ``config`` in ``folder`` (jcv.train.trainer.fit), evaluates its last checkpoint on
  the test split -> a comparison row, also written to ``folder/result.json``."""
  from jcv.train.trainer import fit
  sources, folder = sources or {}, pathlib.Path(folder)
  results = fit(config, workdir=folder, train_source=sources.get("train"), eval_source=sources.get("eval"),
                restart=restart)
  split = test_split(config)
  test = evaluation.evaluate(folder, split=split, which="latest", source=sources.get("test"))
  row = {"run": folder.name, "val_top1": (results["final"]["eval"] or {}).get("top1"), "test_top1": test["top1"],
         "test_n": test["n"], "best_val_top1": (results.get("best") or {}).get("top1"), "test_loss": test["loss"], "steps": results["steps"],
         "epochs": results["epochs"], "wall_time_s": results["wall_time_s"],
         "train_img_per_s": results.get("train_img_per_s"), "image_size": config.data.image_size,
         "config": config.to_dict()}
  log_lib.write_json(folder / "result.json", row)
  print(f"{row['run']}: val top-1 {row['val_top1'] or float('nan'):.4f}, test top-1 {row['test_top1']:.4f}, "
        f"{row['wall_time_s']:.0f}s")
  return row


def subset_sources(config, limit: int, *, size: int | None = None) -> dict:
  """A seeded random ``limit`` images of each of a run's train, eval and test splits (resized to
  ``size`` px when given; jcv.data.subsets.subset): ``fit_and_test(sources=...)`` for quick runs."""
  from jcv.data.subsets import subset
  splits = {"train": config.data.train_split, "eval": config.data.eval_split, "test": test_split(config)}
  return {k: subset(build.build_source(config, s), limit, seed=config.run.seed, size=size) for k, s in splits.items()}


def _cell(value) -> str:
  if isinstance(value, int) and not isinstance(value, bool):
    return f"{value:,}"
  if isinstance(value, float):
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.0f}"
  return "" if value is None else str(value)


def compare_runs(workdir, rows: list[dict], *, columns: dict, title: str, curves: bool = True, note: str = "") -> str:
  """``WORKDIR/comparison.{md,json}`` (a markdown table of ``columns``: key -> header, then ``note``
  and the machine) and, with ``curves``, ``comparison.png`` (each run's validation accuracy from
  ``WORKDIR/<run>/metrics.jsonl``)."""
  from jcv import plots
  workdir = pathlib.Path(workdir)
  lines = ["| " + " | ".join(columns.values()) + " |", "| --- |" + " ---: |" * (len(columns) - 1)]
  lines += ["| " + " | ".join(_cell(r.get(k)) for k in columns) + " |" for r in rows]
  lines.append(f"\n{note + ' ' if note else ''}Machine: {machine()}.")
  table = "\n".join(lines) + "\n"
  safefile.write_atomic(workdir / "comparison.md", table)
  log_lib.write_json(workdir / "comparison.json", [{k: v for k, v in r.items() if k != "config"} for r in rows])
  if curves:
    logs = {r["run"]: workdir / r["run"] / "metrics.jsonl" for r in rows}
    plots.curves_by_run({run: log_lib.read_jsonl(path) for run, path in logs.items() if path.exists()},
                        workdir / "comparison.png", title=title)
  print(table)
  return table


def read_rows(workdir, names) -> list[dict]:
  """The ``result.json`` rows of the runs ``WORKDIR/<name>`` that have one, in ``names`` order."""
  workdir = pathlib.Path(workdir)
  return [json.loads((workdir / n / "result.json").read_text()) for n in names if (workdir / n / "result.json").exists()]
