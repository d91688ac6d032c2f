"""jcv.ops colour processing against OpenCV, scikit-image and NumPy."""
import functools

import cv2
import jax
import numpy as np
import pytest
from skimage import exposure

from jcv import ops


def _per_image(fn, images):
  return np.stack([fn(image) for image in images])


def test_brightness_and_contrast_match_opencv(images):
  got = jax.jit(functools.partial(ops.adjust_brightness, delta=0.1))(images)
  np.testing.assert_allclose(got, _per_image(lambda x: cv2.add(x, (0.1, 0.1, 0.1, 0)), images), atol=1e-7)
  got = jax.jit(functools.partial(ops.adjust_contrast, factor=1.5))(images)

  def cv_contrast(x):  # factor * x + (1 - factor) * per-channel mean
    mean = np.broadcast_to(np.asarray(cv2.mean(x)[:3], np.float32), x.shape)
    return cv2.addWeighted(x, 1.5, np.ascontiguousarray(mean), -0.5, 0)

  np.testing.assert_allclose(got, _per_image(cv_contrast, images), atol=1e-5)


@pytest.mark.parametrize("gamma,gain", [(0.5, 1.0), (2.2, 0.8)])
def test_gamma_matches_skimage(gamma, gain, images):
  got = jax.jit(functools.partial(ops.adjust_gamma, gamma=gamma, gain=gain))(images)
  np.testing.assert_allclose(got, exposure.adjust_gamma(images, gamma, gain), atol=1e-6)


def _cv_hsv_edit(image, *, hue_degrees=0.0, saturation_factor=1.0):
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[..., 0] = np.mod(hsv[..., 0] + hue_degrees, 360)
  hsv[..., 1] = np.clip(hsv[..., 1] * saturation_factor, 0, 1)
  return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def test_saturation_and_hue_match_opencv_hsv(images):
  got = jax.jit(functools.partial(ops.adjust_saturation, factor=0.4))(images)
  want = _per_image(functools.partial(_cv_hsv_edit, saturation_factor=0.4), images)
  np.testing.assert_allclose(got, want, atol=1e-4)  # OpenCV's float32 degree maths
  got = jax.jit(functools.partial(ops.adjust_hue, delta=0.25))(images)
  want = _per_image(functools.partial(_cv_hsv_edit, hue_degrees=90.0), images)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_auto_contrast_matches_opencv_normalize(images):
  dim = images * 0.5 + 0.2
  got = np.asarray(jax.jit(ops.auto_contrast)(dim))
  want = _per_image(lambda x: np.stack(
      [cv2.normalize(np.ascontiguousarray(x[..., c]), None, 0, 1, cv2.NORM_MINMAX) for c in range(3)], -1), dim)
  np.testing.assert_allclose(got, want, atol=1e-6)
  flat = np.full((4, 4, 3), 0.3, np.float32)
  np.testing.assert_array_equal(ops.auto_contrast(flat), flat)


def test_gray_world_balance(images):
  tinted = images * np.asarray([1.0, 0.8, 0.6], np.float32)
  got = np.asarray(jax.jit(ops.gray_world_balance)(tinted))
  means = tinted.mean(axis=(1, 2), keepdims=True)
  want = np.clip(tinted * means.mean(-1, keepdims=True) / means, 0, 1)  # NumPy reference
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)  # float32 vs float64 means
  # Without clipping the channel means become equal (the grey-world assumption).
  small = tinted * 0.5
  balanced = np.asarray(ops.gray_world_balance(small)).mean(axis=(1, 2))
  np.testing.assert_allclose(balanced, balanced.mean(-1, keepdims=True).repeat(3, -1), atol=1e-5)


def test_gradients_finite(images):
  x = images[:2, :8, :8]

  def loss(x):
    return (ops.adjust_brightness(x, delta=0.1).sum() + ops.adjust_contrast(x, factor=1.3).sum()
            + ops.adjust_gamma(x, gamma=1.5).sum() + ops.adjust_saturation(x, factor=0.7).sum()
            + ops.adjust_hue(x, delta=0.1).sum() + ops.auto_contrast(x).sum()
            + ops.gray_world_balance(x).sum())

  grad = np.asarray(jax.jit(jax.grad(loss))(x))
  assert np.isfinite(grad).all()
