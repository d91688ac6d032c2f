"""Figures of a training run and its predictions: training curves, confusion matrix, worst mistakes,
top-k bars per image, runs compared (curves, accuracy against cost), images with their histograms
(matplotlib, Agg)."""
from __future__ import annotations

import itertools
import math
import pathlib

import numpy as np

__all__ = ["training_curves", "confusion_matrix", "confusion_counts", "worst_mistakes", "prediction_grid",
           "prediction_bars", "curves_by_run", "accuracy_vs_cost", "images_with_histograms"]

# prediction_bars: inches per panel (image and bars side by side) at _save's 100 dpi.
PANEL_SIZE = (6.0, 2.6)


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def training_curves(history: list[dict], path, *, x: str = "step") -> pathlib.Path:
  """Loss and top-1 of train and eval on one axis each, and the learning rate, against ``x``
  ("step" or "epoch": a key of the records), from metrics.jsonl records.

  A panel is drawn only for what the history holds (no learning rate logged: no such panel);
  a resumed run's repeated steps keep their last record.
  """
  plt = _plt()
  series = {}
  for split in ("train", "eval"):
    rows = [r for r in history if r.get("split") == split and x in r]
    rows = sorted({r[x]: r for r in rows}.values(), key=lambda r: r[x])
    if rows:
      series[split] = rows
  panels = [(key, title) for key, title in (("loss", "loss"), ("top1", "top-1 accuracy"))
            if any(key in r for rows in series.values() for r in rows)]
  if any("lr" in r for r in series.get("train", [])):
    panels.append(("lr", "learning rate"))
  if not panels:
    raise ValueError("training_curves: the history has no loss, top1 or lr records")
  fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4), squeeze=False)
  styles = {"train": dict(linestyle="-", linewidth=1.2), "eval": dict(marker="o", markersize=3)}
  for ax, (key, title) in zip(axes[0], panels):
    for split, rows in series.items():
      if key == "lr" and split != "train":
        continue
      pts = [(r[x], r[key]) for r in rows if key in r]
      if pts:
        ax.plot(*zip(*pts), label=split if key != "lr" else None, **styles[split])
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.grid(alpha=0.3)
    if key != "lr":
      ax.legend()
  fig.tight_layout()
  return _save(fig, path)


def confusion_counts(labels, predictions, num_classes: int) -> np.ndarray:
  """Counts [true, predicted] (numpy, int64)."""
  counts = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
  return counts


def confusion_matrix(labels, predictions, class_names, path) -> pathlib.Path:
  """Row-normalised confusion matrix with counts in the cells (up to 30 classes annotated)."""
  plt = _plt()
  n = len(class_names) or int(max(np.max(labels), np.max(predictions))) + 1
  counts = confusion_counts(labels, predictions, n)
  rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  size = max(5, 0.5 * n)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
  names = class_names or [str(i) for i in range(n)]
  ax.set_xticks(range(n), names, rotation=60, ha="right")
  ax.set_yticks(range(n), names)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  if n <= 30:
    for i in range(n):
      for j in range(n):
        ax.text(j, i, counts[i, j], ha="center", va="center", fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black")
  acc = np.trace(counts) / max(counts.sum(), 1)
  ax.set_title(f"confusion matrix (top-1 {acc:.2%}, n={counts.sum()})")
  fig.colorbar(im, ax=ax, fraction=0.046)
  fig.tight_layout()
  return _save(fig, path)


def worst_mistakes(logits, labels, index, source, class_names, path, *, count: int = 16) -> pathlib.Path:
  """The ``count`` wrong predictions with the highest confidence, with true/predicted names."""
  plt = _plt()
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  pred = probs.argmax(-1)
  wrong = np.flatnonzero(pred != np.asarray(labels))
  order = wrong[np.argsort(-probs[wrong, pred[wrong]])][:count]
  cols = 4
  rows = max(1, -(-len(order) // cols))
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
  name = (lambda i: class_names[i]) if class_names else str
  for ax in axes.ravel():
    ax.axis("off")
  for ax, i in zip(axes.ravel(), order):
    ax.imshow(source[int(index[i])]["image"])
    ax.set_title(f"true {name(int(labels[i]))}\npred {name(int(pred[i]))} {probs[i, pred[i]]:.0%}", fontsize=8)
  fig.suptitle("most confident mistakes")
  fig.tight_layout()
  return _save(fig, path)


def _save(fig, path, dpi: int = 100) -> pathlib.Path:
  import io
  from jcv import safefile
  path = pathlib.Path(path)
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=dpi, format=path.suffix[1:] or "png")
  _plt().close(fig)
  safefile.write_atomic(path, buffer.getvalue())
  return path


def prediction_grid(images, labels, predictions, class_names, path, *, count: int = 16) -> pathlib.Path:
  """A grid of images titled 'predicted (true: label)', green when right, red when wrong."""
  plt = _plt()
  cols = 4
  rows = max(1, (min(count, len(images)) + cols - 1) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
  for ax in axes.ravel():
    ax.axis("off")
  for ax, image, label, pred in zip(axes.ravel(), images, labels, predictions):
    ax.imshow(image)
    ax.set_title(f"{class_names[pred]}\n(true: {class_names[label]})", fontsize=9,
                 color="green" if pred == label else "red")
  fig.tight_layout()
  return _save(fig, path)


def prediction_bars(images, predictions, path, *, titles=(), columns: int = 2) -> pathlib.Path:
  """One panel per image: the image and its top-k classes as horizontal probability bars.

  ``predictions``: per image a list of ``(class name, probability)`` pairs, best first (the
  ``"top"`` of ``jcv predict``). Panels fill ``columns`` per row; the PNG is exactly
  ``PANEL_SIZE`` x 100 pixels per panel.
  """
  plt = _plt()
  if len(images) != len(predictions) or not len(images):
    raise ValueError(f"prediction_bars: need one prediction list per image; got {len(images)} images "
                     f"and {len(predictions)} predictions")
  cols = min(columns, len(images))
  rows = -(-len(images) // cols)
  slots = max(len(top) for top in predictions)
  fig = plt.figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows))
  grid = fig.add_gridspec(rows, 2 * cols, width_ratios=[1, 1.4] * cols, wspace=0.05, hspace=0.3,
                          left=0.01, right=0.99, top=0.9, bottom=0.08)
  for i, (image, top) in enumerate(zip(images, predictions)):
    r, c = divmod(i, cols)
    ax_im, ax_bar = fig.add_subplot(grid[r, 2 * c]), fig.add_subplot(grid[r, 2 * c + 1])
    ax_im.imshow(image)
    ax_im.axis("off")
    ax_im.set_title(str(titles[i]) if i < len(titles) else "", fontsize=9)
    y = slots - 1 - np.arange(len(top))  # best on top; always ``slots`` rows, so bars keep one height
    probs = np.array([float(p) for _, p in top])
    ax_bar.barh(y, probs, height=0.7, color=["#2a6"] + ["#9ab"] * (len(top) - 1))
    for yy, (name, p) in zip(y, top):
      ax_bar.text(float(p) + 0.03, yy, f"{float(p):.1%}  {name}", va="center", fontsize=8)
    ax_bar.set_xlim(0, 2.0)  # bars up to 1, the labels after them
    ax_bar.set_ylim(-0.6, slots - 0.4)
    ax_bar.set_xticks([0, 0.5, 1.0], ["0", "50%", "100%"], fontsize=7)
    ax_bar.set_yticks([])
    ax_bar.spines[["top", "right", "left"]].set_visible(False)
    ax_bar.spines["bottom"].set_bounds(0, 1)
  return _save(fig, path)


def curves_by_run(curves: dict, path, *, metric: str = "top1", title: str = "") -> pathlib.Path:
  """One line per run: ``curves`` maps a run's name to its metrics.jsonl records; plots the
  eval ``metric`` against the epoch."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 4))
  for (name, records), style in zip(curves.items(), itertools.cycle(("-o", "--s", "-^", "-d", ":x"))):
    rows = [r for r in records if r.get("split") == "eval" and metric in r and "epoch" in r]
    ax.plot([r["epoch"] for r in rows], [r[metric] for r in rows], style, markersize=4, label=name)
  ax.set_xlabel("epoch")
  ax.set_ylabel(f"validation {metric}")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  return _save(fig, path)



def accuracy_vs_cost(rows: list[dict], path, *, metric: str = "test_top1",
                     costs=(("params", "parameters"), ("train_img_per_s", "training images / s")),
                     title: str = "") -> pathlib.Path:
  """One panel per cost (log scale): each row a point at (``row[cost]``, ``row[metric]``) labelled
  with ``row["run"]``; a row without the metric (a diverged run) is a red cross at 0."""
  plt = _plt()
  fig, axes = plt.subplots(1, len(costs), figsize=(6.5 * len(costs), 5), squeeze=False)
  for ax, (key, label) in zip(axes[0], costs):
    for row in rows:
      if not row.get(key):
        continue
      failed = row.get(metric) is None
      y = 0.0 if failed else row[metric]
      ax.plot(row[key], y, "x" if failed else "o", color="tab:red" if failed else "tab:blue", markersize=6)
      ax.annotate(row["run"] + (" (diverged)" if failed else ""), (row[key], y), textcoords="offset points",
                  xytext=(4, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(metric.replace("_", " ").replace("top1", "top-1"))
    ax.grid(alpha=0.3, which="both")
  fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def images_with_histograms(panels, path, *, columns: int = 7) -> pathlib.Path:
  """``panels``: (title, image [H, W, C] in [0, 1], histogram counts [C, 256]) each -> one PNG,
  ``columns`` images per row, each above its per-channel histogram (experiments/image_ops.py)."""
  plt = _plt()
  rows = math.ceil(len(panels) / columns)
  fig, axes = plt.subplots(2 * rows, columns, figsize=(2.4 * columns, 3.4 * rows),
                           gridspec_kw={"height_ratios": [2.4, 1] * rows})
  for ax in axes.ravel():
    ax.axis("off")
  for k, (title, image, counts) in enumerate(panels):
    r, c = divmod(k, columns)
    ax = axes[2 * r, c]
    image = np.clip(np.asarray(image), 0, 1)
    ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)
    hist = axes[2 * r + 1, c]
    hist.axis("on")
    colours = ["black"] if counts.shape[0] == 1 else ["tab:red", "tab:green", "tab:blue"]
    counts = counts / max(counts.sum() / counts.shape[0], 1)
    for channel, colour in zip(counts, colours):
      hist.plot(np.linspace(0, 1, channel.shape[0]), channel, color=colour, lw=0.8)
    # Scale to the inner bins: black or saturated pixels (bins 0 and 255) would flatten the rest.
    hist.set_ylim(0, 1.15 * max(float(counts[:, 1:-1].max()), 1e-6))
    hist.set_yticks([])
    hist.set_xticks([0, 0.5, 1])
    hist.tick_params(labelsize=6)
  fig.tight_layout()
  return _save(fig, path, dpi=110)
