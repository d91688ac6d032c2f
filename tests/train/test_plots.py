"""Figures: confusion counts against a plain loop; images are written and decodable."""
import numpy as np
import pytest
from PIL import Image

from jcv import plots
from jcv.data.sources import ArraySource
from tiny import random_images


def test_confusion_counts_match_loop(tmp_path):
  rng = np.random.default_rng(0)
  labels, preds = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
  want = np.zeros((4, 4), int)
  for t, p in zip(labels, preds):
    want[t, p] += 1
  np.testing.assert_array_equal(plots.confusion_counts(labels, preds, 4), want)
  path = plots.confusion_matrix(labels, preds, ["a", "b", "c", "d"], tmp_path / "c.png")
  assert Image.open(path).size[0] > 100


def test_curves_and_mistakes_render(tmp_path):
  history = [{"split": "train", "step": s, "loss": 2.0 / s, "top1": 0.1 * s, "lr": 0.1} for s in (1, 2, 3, 2, 3)]
  history += [{"split": "eval", "step": 3, "loss": 1.0, "top1": 0.5}]
  assert Image.open(plots.training_curves(history, tmp_path / "curves.png")).size[0] > 100
  images, labels = random_images(6, num_classes=3)
  src = ArraySource(images, labels, class_names=["x", "y", "z"])
  logits = np.eye(3)[(labels + 1) % 3] * 5.0  # every prediction wrong
  path = plots.worst_mistakes(logits, labels, np.arange(6), src, src.class_names, tmp_path / "m.png", count=4)
  assert Image.open(path).size[0] > 100


def test_prediction_bars_one_panel_per_image(tmp_path, shared_dir):
  from jcv.data import decode
  root = shared_dir / "data" / "cats_vs_dogs" / "test"
  images = [decode.decode_image(root / c / f"{c}.{n}.jpg") for c, n in (("cat", 4001), ("dog", 4001), ("dog", 4002))]
  top = [[["dog", 0.91], ["cat", 0.05], ["fox", 0.02], ["wolf", 0.01], ["lynx", 0.01]],
         [["cat", 0.5], ["dog", 0.5]], [["dog", 1.0]]]
  path = plots.prediction_bars(images, top, tmp_path / "p.png", titles=["a.jpg", "b.jpg", "c.jpg"])
  with Image.open(path) as png:
    png.verify()
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size == (1200, 520)  # 2 columns x 2 rows of 600 x 260 pixels
    rgb = np.asarray(png.convert("RGB")).astype(int)
  green = (np.abs(rgb - [0x22, 0xAA, 0x66]) < 8).all(-1)  # the top class's bar
  rows = np.flatnonzero(green.any(1))
  assert len(rows) and rows.min() < 260 and rows.max() > 260  # a bar in both panel rows
  # The first panel's top bar (91 %) is longer than the second's (50 %).
  first, second = green[:260, :600].any(0).sum(), green[:260, 600:].any(0).sum()
  assert first > 1.6 * second > 0
  with pytest.raises(ValueError, match="one prediction list per image"):
    plots.prediction_bars(images, top[:2], tmp_path / "q.png")
