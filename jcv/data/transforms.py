"""Host-side (numpy/PIL) uint8 image transforms used by the grain loaders.

All take and return uint8 [H, W, 3] arrays; random ones take a ``np.random.Generator``
first. Resizing is PIL bilinear with antialiasing when shrinking.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = [
  "center_crop", "eval_resize_crop", "pad_crop", "random_flip", "random_resized_crop",
  "resize", "resize_shorter", "sample_crop_box",
]


def resize(image: np.ndarray, size: tuple[int, int], *, box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Resizes (the ``box`` = (left, top, right, bottom) region of) ``image`` to (height, width)."""
  h, w = size
  if box is None and image.shape[:2] == (h, w):
    return image
  out = Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR, box=box)
  return np.asarray(out)


def resize_shorter(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes so the shorter side is ``size``, keeping the aspect ratio."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  if h <= w:
    return resize(image, (size, max(1, round(w * size / h))))
  return resize(image, (max(1, round(h * size / w)), size))


def center_crop(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
  """The centred ``size`` crop (images smaller than ``size`` are zero-padded first)."""
  ch, cw = (size, size) if isinstance(size, int) else size
  h, w = image.shape[:2]
  if h < ch or w < cw:
    ph, pw = max(0, ch - h), max(0, cw - w)
    image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    h, w = image.shape[:2]
  top, left = (h - ch) // 2, (w - cw) // 2
  return image[top:top + ch, left:left + cw]


def eval_resize_crop(image: np.ndarray, size: int, *, crop_fraction: float = 0.875) -> np.ndarray:
  """Evaluation view: shorter side to ``round(size / crop_fraction)``, then centre ``size`` crop.

  Images already ``size`` x ``size`` are returned unchanged (CIFAR at 32).
  """
  if image.shape[:2] == (size, size):
    return image
  return center_crop(resize_shorter(image, max(size, round(size / crop_fraction))), size)


def sample_crop_box(
  rng: np.random.Generator, height: int, width: int, *,
  scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3), attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Inception-style crop box (top, left, h, w): area fraction in ``scale``, log-uniform
  aspect ``ratio``; after ``attempts`` misses, the centred crop with the ratio clamped."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(
  rng: np.random.Generator, image: np.ndarray, size: int, *,
  scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
  """Inception-style random crop (see :func:`sample_crop_box`) resized to ``size`` x ``size``."""
  top, left, h, w = sample_crop_box(rng, *image.shape[:2], scale=scale, ratio=ratio)
  return resize(image, (size, size), box=(left, top, left + w, top + h))


def pad_crop(rng: np.random.Generator, image: np.ndarray, *, padding: int = 4) -> np.ndarray:
  """Zero-pads ``padding`` pixels on every side and takes a random crop of the original size."""
  h, w = image.shape[:2]
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  return padded[top:top + h, left:left + w]


def random_flip(rng: np.random.Generator, image: np.ndarray, *, probability: float = 0.5) -> np.ndarray:
  """Horizontal flip with ``probability``."""
  return image[:, ::-1] if rng.random() < probability else image
