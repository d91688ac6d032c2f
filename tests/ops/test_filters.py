"""jcv.ops filters against OpenCV (same border modes), SciPy and scikit-image."""
import functools

import cv2
import jax
import numpy as np
import pytest
from scipy import ndimage
from skimage import filters as skfilters

from jcv import ops

CV_BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "symmetric": cv2.BORDER_REFLECT,
              "edge": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}
ATOL = 2e-6  # float32 sums of a few dozen terms, both sides


def _per_image(fn, images):
  return np.stack([fn(image) for image in images])


@pytest.mark.parametrize("border", list(CV_BORDERS))
def test_convolve_matches_filter2d_and_scipy(border, images):
  kernel = np.random.default_rng(1).normal(size=(3, 5)).astype(np.float32)
  got = jax.jit(functools.partial(ops.convolve, border=border))(images, kernel)
  # cv2.filter2D correlates, so it gets the flipped kernel.
  want = _per_image(lambda x: cv2.filter2D(x, -1, kernel[::-1, ::-1].copy(),
                                           borderType=CV_BORDERS[border]), images)
  np.testing.assert_allclose(got, want, atol=1e-5)
  if border == "reflect":
    scipy = ndimage.convolve(images, kernel[None, :, :, None].astype(np.float64), mode="mirror")
    np.testing.assert_allclose(got, scipy, atol=1e-5)


def test_convolve_large_kernel_uses_conv_path(images):
  kernel = np.random.default_rng(2).random((11, 9), dtype=np.float32)
  kernel /= kernel.sum()
  got = jax.jit(ops.convolve)(images, kernel)
  want = _per_image(lambda x: cv2.filter2D(x, -1, kernel[::-1, ::-1].copy()), images)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("border", list(CV_BORDERS))
def test_box_blur_matches_opencv(border, images):
  got = jax.jit(functools.partial(ops.box_blur, kernel_size=5, border=border))(images)
  want = _per_image(lambda x: cv2.blur(x, (5, 5), borderType=CV_BORDERS[border]), images)
  np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize("sigma,kernel_size", [(1.5, None), (0.8, 5), (3.0, 9)])
def test_gaussian_blur_matches_opencv(sigma, kernel_size, images):
  got = jax.jit(functools.partial(ops.gaussian_blur, sigma=sigma, kernel_size=kernel_size))(images)
  k = kernel_size or 0  # 0: OpenCV picks the size from sigma, as jcv's default
  want = _per_image(lambda x: cv2.GaussianBlur(x, (k, k), sigma), images)
  np.testing.assert_allclose(got, want, atol=ATOL)
  np.testing.assert_allclose(ops.gaussian_kernel(sigma=sigma, kernel_size=k or 11),
                             cv2.getGaussianKernel(k or 11, sigma)[:, 0], atol=1e-7)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_median_blur_matches_opencv(kernel_size, images):
  got = jax.jit(functools.partial(ops.median_blur, kernel_size=kernel_size))(images)
  want = _per_image(lambda x: cv2.medianBlur(x, kernel_size), images)  # float: ksize 3 or 5
  np.testing.assert_array_equal(got, want)  # a selection, so exact


def test_median_blur_large_matches_scipy(images):
  got = jax.jit(functools.partial(ops.median_blur, kernel_size=7, border="symmetric"))(images)
  want = ndimage.median_filter(images, size=(1, 7, 7, 1), mode="reflect")  # scipy reflect = symmetric
  np.testing.assert_array_equal(got, want)


def test_bilateral_matches_opencv(images):
  fn = functools.partial(ops.bilateral_filter, kernel_size=7, sigma_color=0.15, sigma_space=3.0)
  got = jax.jit(fn)(images)
  want = _per_image(lambda x: cv2.bilateralFilter(x, 7, 0.15, 3.0), images)
  # OpenCV interpolates exp() from a 4096-bin table per channel: within 1e-4.
  np.testing.assert_allclose(got, want, atol=1e-4)
  gray = images[..., :1]
  got = jax.jit(fn)(gray)
  want = _per_image(lambda x: cv2.bilateralFilter(x, 7, 0.15, 3.0)[..., None], gray)
  np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_sobel_matches_opencv(kernel_size, images):
  dx, dy = jax.jit(functools.partial(ops.sobel, kernel_size=kernel_size))(images)
  want_dx = _per_image(lambda x: cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=kernel_size), images)
  want_dy = _per_image(lambda x: cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=kernel_size), images)
  np.testing.assert_allclose(dx, want_dx, atol=1e-5)
  np.testing.assert_allclose(dy, want_dy, atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_laplacian_matches_opencv(kernel_size, images):
  got = jax.jit(functools.partial(ops.laplacian, kernel_size=kernel_size))(images)
  want = _per_image(lambda x: cv2.Laplacian(x, cv2.CV_32F, ksize=kernel_size), images)
  np.testing.assert_allclose(got, want, atol=5e-5)  # kernel sums up to 32 x values in [0, 1]


def test_unsharp_mask_matches_skimage(images):
  sigma, amount = 1.5, 1.2
  size = 2 * int(4 * sigma + 0.5) + 1  # scikit-image truncates the Gaussian at 4 sigma
  fn = functools.partial(ops.unsharp_mask, sigma=sigma, amount=amount, kernel_size=size,
                         border="symmetric")
  # One channel at a time: scikit-image 0.26's channel_axis path returns values > 1 on float32.
  want = np.stack([skfilters.unsharp_mask(images[i, ..., c], radius=sigma, amount=amount)
                   for i in range(len(images)) for c in range(3)]).reshape(4, 3, 72, 96)
  want = want.transpose(0, 2, 3, 1)
  np.testing.assert_allclose(jax.jit(fn)(images), want, atol=1e-5)


def test_leading_dims_and_vmap(images):
  fn = jax.jit(functools.partial(ops.gaussian_blur, sigma=1.0))
  nested = images.reshape((2, 2) + images.shape[1:])
  np.testing.assert_allclose(fn(nested).reshape(images.shape), fn(images), atol=1e-6)
  np.testing.assert_allclose(jax.vmap(fn)(images), fn(images), atol=1e-6)
  single = ops.gaussian_blur(images[0], sigma=1.0)
  np.testing.assert_allclose(single, fn(images)[0], atol=1e-6)


def test_traced_kernel_and_sigma(images):
  kernel = np.outer([1, 2, 1], [1, 2, 1]).astype(np.float32) / 16
  got = jax.jit(ops.convolve)(images, kernel)  # kernel traced
  np.testing.assert_allclose(got, ops.gaussian_blur(images, sigma=0.8493218, kernel_size=3), atol=1e-3)
  blur = jax.jit(lambda x, s: ops.gaussian_blur(x, sigma=s, kernel_size=7))(images, 1.3)
  np.testing.assert_allclose(blur, _per_image(lambda x: cv2.GaussianBlur(x, (7, 7), 1.3), images),
                             atol=ATOL)


def test_gradients_finite(images):
  x = images[:1, :16, :16]

  def loss(x):
    return (ops.gaussian_blur(x, sigma=1.0).sum() + ops.box_blur(x, kernel_size=3).sum()
            + ops.median_blur(x, kernel_size=3).sum()
            + ops.bilateral_filter(x, kernel_size=3, sigma_color=0.1, sigma_space=2.0).sum()
            + sum(d.sum() for d in ops.sobel(x)) + ops.laplacian(x).sum()
            + ops.unsharp_mask(x).sum() + ops.convolve(x, np.ones((3, 3)) / 9).sum())

  grad = jax.jit(jax.grad(loss))(x)
  assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
