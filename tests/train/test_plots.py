"""Figures: confusion counts against a plain loop; images are written and decodable."""
import numpy as np
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
