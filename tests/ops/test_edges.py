"""jcv.ops.canny against OpenCV's cv2.Canny on real photos."""
import functools

import cv2
import jax
import numpy as np
import pytest

from jcv import ops


def _agreement(got, want):
  """Fraction of pixels that agree, and intersection-over-union of the edge pixels."""
  got, want = got.astype(bool), want.astype(bool)
  return (got == want).mean(), (got & want).sum() / max((got | want).sum(), 1)


@pytest.mark.parametrize("low,high,l2", [(50, 150, False), (40, 120, True), (100, 200, False)])
def test_canny_matches_opencv(low, high, l2, photos_u8):
  gray = np.stack([cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) for img in photos_u8.values()])
  fn = jax.jit(functools.partial(ops.canny, low_threshold=low / 255, high_threshold=high / 255,
                                 sigma=0, l2_gradient=l2))
  got = np.asarray(fn(gray[..., None].astype(np.float32) / 255))[..., 0]
  assert set(np.unique(got)) <= {0.0, 1.0}
  want = np.stack([cv2.Canny(g, low, high, L2gradient=l2) > 0 for g in gray])
  # Same algorithm and tie-breaking (jcv treats float32 magnitudes within 1e-5 as equal): exact.
  np.testing.assert_array_equal(got.astype(bool), want)


def test_canny_rgb_blurs_luma(photo):
  fn = jax.jit(functools.partial(ops.canny, low_threshold=0.2, high_threshold=0.5, sigma=1.0))
  edges = np.asarray(fn(photo))
  assert edges.shape == photo.shape[:2] + (1,)
  u8 = np.round(cv2.GaussianBlur(cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY), (0, 0), 1.0) * 255).astype(np.uint8)
  want = cv2.Canny(u8, 0.2 * 255, 0.5 * 255) > 0
  agree, iou = _agreement(edges[..., 0], want)
  assert agree > 0.98 and iou > 0.7, (agree, iou)  # OpenCV sees the blur quantised to uint8


def test_canny_rejects_bad_thresholds(photo):
  with pytest.raises(ValueError, match="low_threshold <= high_threshold"):
    ops.canny(photo, low_threshold=0.5, high_threshold=0.1)
