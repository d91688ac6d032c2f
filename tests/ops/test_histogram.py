"""jcv.ops histograms, equalisation and CLAHE against NumPy and OpenCV on uint8 photos."""
import functools

import cv2
import jax
import numpy as np
import pytest

from jcv import ops


def test_histogram_matches_numpy(images):
  counts = np.asarray(jax.jit(ops.histogram)(images))
  assert counts.shape == (4, 3, 256)
  for image, per_channel in zip(images, counts):
    for c in range(3):
      want, _ = np.histogram(image[..., c], bins=256, range=(0, 1))
      np.testing.assert_array_equal(per_channel[c], want)
  coarse = ops.histogram(images[0], num_bins=10)
  np.testing.assert_array_equal(coarse[0], np.histogram(images[0, ..., 0], bins=10, range=(0, 1))[0])


def test_histogram_counts_uint8_levels(photo_u8):
  counts = np.asarray(ops.histogram(photo_u8.astype(np.float32) / 255))
  for c in range(3):
    np.testing.assert_array_equal(counts[c], cv2.calcHist([photo_u8], [c], None, [256], [0, 256]).reshape(-1))


def test_equalize_matches_opencv(photos_u8):
  u8 = np.stack(list(photos_u8.values()))
  got = np.asarray(jax.jit(ops.equalize_histogram)(u8.astype(np.float32) / 255))
  want = np.stack([np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(3)], -1)
                   for img in u8])
  diff = np.abs(np.round(got * 255) - want)
  # Same look-up table; a level may differ by one where the float32 product lands on .5.
  assert diff.max() <= 1 and (diff == 0).mean() > 0.995


def test_equalize_constant_channel_unchanged():
  image = np.full((8, 8, 1), 0.4, np.float32)
  np.testing.assert_allclose(jax.jit(ops.equalize_histogram)(image), np.round(0.4 * 255) / 255, atol=1e-7)


@pytest.mark.parametrize("clip_limit,tile_grid,size", [
    (2.0, (8, 8), (72, 96)),    # divisible: 9x12 tiles
    (3.0, (4, 6), (70, 93)),    # not divisible: OpenCV's reflect-101 extension
    (0.0, (2, 3), (72, 96)),    # no clipping
])
def test_clahe_matches_opencv(clip_limit, tile_grid, size, photos_u8):
  gray = np.stack([cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)[:size[0], :size[1]] for img in photos_u8.values()])
  fn = jax.jit(functools.partial(ops.clahe, clip_limit=clip_limit, tile_grid=tile_grid))
  got = np.asarray(fn(gray[..., None].astype(np.float32) / 255))[..., 0]
  engine = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid[1], tile_grid[0]))
  want = np.stack([engine.apply(g) for g in gray])
  diff = np.abs(np.round(got * 255) - want)
  # Same tables and blending (exact when run eagerly); under jit XLA may fuse a * b + c into
  # one FMA, which moves a level by one where the float32 blend lands on a .5 tie.
  assert diff.max() <= 1 and (diff == 0).mean() > 0.995


def test_clahe_colour_is_per_channel(photo):
  fn = jax.jit(ops.clahe)
  both = fn(photo)
  for c in range(3):
    np.testing.assert_allclose(both[..., c:c + 1], fn(photo[..., c:c + 1]), atol=1e-7)
