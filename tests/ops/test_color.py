"""jcv.ops colour spaces against OpenCV, scikit-image, colorsys and PIL, plus round trips."""
import colorsys

import cv2
import jax
import numpy as np
import pytest
from PIL import Image
from skimage import color as skcolor

from jcv import ops

PAIRS = [
    (ops.rgb_to_hsv, ops.hsv_to_rgb),
    (ops.rgb_to_hls, ops.hls_to_rgb),
    (ops.rgb_to_ycbcr, ops.ycbcr_to_rgb),
    (ops.rgb_to_xyz, ops.xyz_to_rgb),
    (ops.rgb_to_lab, ops.lab_to_rgb),
]
IDS = [p[0].__name__ for p in PAIRS]
# Greys, black, white, primaries and secondaries: the guarded divisions inside HSV/HLS.
SPECIAL = np.array([[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 0], [0, 1, 0], [0, 0, 1],
                    [1, 1, 0], [0, 1, 1], [1, 0, 1], [0.2, 0.2, 0.2], [1, 0.5, 0], [0, 0, 0.01]],
                   np.float32)


def _with_special(images):
  out = images.copy()
  out[:, 0, :len(SPECIAL)] = SPECIAL
  return out


def test_grayscale_matches_opencv(images):
  got = np.asarray(jax.jit(ops.rgb_to_grayscale)(images))
  assert got.shape == images.shape[:3] + (1,)
  for image, gray in zip(images, got):
    np.testing.assert_allclose(gray[..., 0], cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), atol=1e-6)
  np.testing.assert_allclose(ops.rgb_to_grayscale(np.ones((1, 1, 3), np.float32)), 1.0, atol=1e-7)
  np.testing.assert_array_equal(ops.grayscale_to_rgb(got), np.repeat(got, 3, axis=-1))


def test_hsv_matches_skimage_and_opencv(images):
  got = np.asarray(jax.jit(ops.rgb_to_hsv)(images))
  np.testing.assert_allclose(got, skcolor.rgb2hsv(images), atol=2e-6)  # hue in turns, like jcv
  for image, hsv in zip(images, got):
    cv_hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # float: hue in degrees
    hue_err = np.abs(hsv[..., 0] * 360 - cv_hsv[..., 0])
    assert np.minimum(hue_err, 360 - hue_err).max() < 5e-3  # degrees; OpenCV works in float32 degrees
    np.testing.assert_allclose(hsv[..., 1:], cv_hsv[..., 1:], atol=5e-5)  # OpenCV's fast reciprocal


def test_hls_matches_colorsys_and_opencv(images):
  got = np.asarray(jax.jit(ops.rgb_to_hls)(images))
  pixels = images[-1].reshape(-1, 3).astype(np.float64)
  want = np.array([colorsys.rgb_to_hls(*p) for p in pixels])
  np.testing.assert_allclose(got[-1].reshape(-1, 3), want, atol=2e-6)
  for image, hls in zip(images, got):
    cv_hls = cv2.cvtColor(image, cv2.COLOR_RGB2HLS)
    hue_err = np.abs(hls[..., 0] * 360 - cv_hls[..., 0])
    assert np.minimum(hue_err, 360 - hue_err).max() < 5e-3  # degrees
    np.testing.assert_allclose(hls[..., 1:], cv_hls[..., 1:], atol=5e-5)  # fast reciprocal
  back = np.asarray(jax.jit(ops.hls_to_rgb)(got))
  np.testing.assert_allclose(back[-1].reshape(-1, 3), [colorsys.hls_to_rgb(*p) for p in want], atol=2e-6)


def test_ycbcr_matches_opencv_and_pil(images, photos_u8):
  got = np.asarray(jax.jit(ops.rgb_to_ycbcr)(images))
  for image, ycbcr in zip(images, got):
    cv_ycrcb = cv2.cvtColor(image, cv2.COLOR_RGB2YCrCb)  # channels (Y, Cr, Cb)
    # OpenCV rounds the chroma scales to 0.713 / 0.564 (JPEG: 0.7133 / 0.5643): <= 4e-4 apart.
    np.testing.assert_allclose(ycbcr, cv_ycrcb[..., [0, 2, 1]], atol=5e-4)
  for u8, ycbcr in zip(photos_u8.values(), got):
    pil = np.asarray(Image.fromarray(u8).convert("YCbCr"), np.float32) / 255
    # PIL works in uint8 with chroma offset 128 (0.502 vs jcv's 0.5): within 2 levels.
    np.testing.assert_allclose(ycbcr, pil, atol=2 / 255)


def test_xyz_and_lab_match_skimage(images):
  np.testing.assert_allclose(jax.jit(ops.rgb_to_xyz)(images), skcolor.rgb2xyz(images), atol=1e-5)
  lab = skcolor.rgb2lab(images)
  np.testing.assert_allclose(jax.jit(ops.rgb_to_lab)(images), lab, atol=2e-4)  # L in [0, 100]
  lab = lab.astype(np.float32)
  np.testing.assert_allclose(jax.jit(ops.lab_to_rgb)(lab), skcolor.lab2rgb(lab), atol=1e-5)
  xyz = skcolor.rgb2xyz(images).astype(np.float32)
  np.testing.assert_allclose(jax.jit(ops.xyz_to_rgb)(xyz), skcolor.xyz2rgb(xyz), atol=1e-5)


@pytest.mark.parametrize("forward,inverse", PAIRS, ids=IDS)
def test_round_trip_within_1e5(forward, inverse, images):
  images = _with_special(images)
  back = jax.jit(lambda x: inverse(forward(x)))(images)
  np.testing.assert_allclose(back, images, atol=1e-5)


@pytest.mark.parametrize("forward,inverse", PAIRS, ids=IDS)
def test_gradients_finite(forward, inverse, images):
  image = _with_special(images[:1, :4, :16])  # includes greys, black and white
  grad = jax.jit(jax.grad(lambda x: forward(x).sum() + inverse(forward(x)).sum()))(image)
  assert np.isfinite(np.asarray(grad)).all()
