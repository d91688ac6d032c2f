"""jcv.ops public API: conventions, input validation messages, jit/vmap over leading dims."""
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcv import ops

# Required keyword options for calling each image op in these tests.
KWARGS = {
    "adjust_brightness": dict(delta=0.1), "adjust_contrast": dict(factor=1.2),
    "adjust_gamma": dict(gamma=2.0), "adjust_saturation": dict(factor=0.5),
    "adjust_hue": dict(delta=0.1), "box_blur": dict(kernel_size=3),
    "gaussian_blur": dict(sigma=1.0), "median_blur": dict(kernel_size=3),
    "bilateral_filter": dict(kernel_size=3, sigma_color=0.1, sigma_space=1.0),
    "resize": dict(height=8, width=8), "crop": dict(top=0, left=0, height=4, width=4),
    "center_crop": dict(height=4, width=4), "rotate": dict(angle=0.1),
    "affine_transform": dict(matrix=np.array([[1.0, 0.1, 0.5], [0.0, 0.9, -0.5]])),
}
NOT_IMAGE_OPS = {"gaussian_kernel"}
IMAGE_OPS = [n for n in ops.__all__ if n not in NOT_IMAGE_OPS]
RGB_ONLY = ["rgb_to_grayscale", "rgb_to_hsv", "hsv_to_rgb", "rgb_to_hls", "hls_to_rgb",
            "rgb_to_ycbcr", "ycbcr_to_rgb", "rgb_to_xyz", "xyz_to_rgb", "rgb_to_lab", "lab_to_rgb",
            "adjust_saturation", "adjust_hue"]
KERNEL_SIZED = ["box_blur", "gaussian_blur", "median_blur", "bilateral_filter", "sobel", "laplacian"]


def _call(name, image):
  fn = getattr(ops, name)
  if name == "convolve":
    return fn(image, np.ones((3, 3), np.float32) / 9)
  if name == "grayscale_to_rgb":
    return fn(image[..., :1])
  return fn(image, **KWARGS.get(name, {}))


def test_public_names_documented_and_keyword_only():
  for name in ops.__all__:
    fn = getattr(ops, name)
    assert inspect.getdoc(fn), name
    params = list(inspect.signature(fn).parameters.values())
    positional = [p.name for p in params if p.kind != inspect.Parameter.KEYWORD_ONLY]
    # Only the image (and convolve's kernel array) may be positional; options are keyword-only.
    assert positional in ([], ["image"], ["image", "kernel"]), (name, positional)
  for name in ("color", "adjust", "histograms", "filters", "edges", "geometry"):
    module = importlib.import_module(f"jcv.ops.{name}")
    assert inspect.getdoc(module) and set(module.__all__) <= set(ops.__all__), name


@pytest.mark.parametrize("name", IMAGE_OPS)
def test_integer_images_rejected(name):
  image = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="floating-point image"):
    _call(name, image)


@pytest.mark.parametrize("name", RGB_ONLY)
def test_wrong_channel_count_rejected(name):
  with pytest.raises(ValueError, match="3 channel"):
    _call(name, np.zeros((8, 8, 4), np.float32))


def test_rank_and_kernel_size_validation():
  with pytest.raises(ValueError, match=r"\[..., height, width, channels\]"):
    ops.box_blur(np.zeros((8, 8), np.float32), kernel_size=3)
  image = np.zeros((8, 8, 3), np.float32)
  for name in KERNEL_SIZED:
    for bad in (4, 0, -3, 2.5):
      kwargs = dict(KWARGS.get(name, {}), kernel_size=bad)
      with pytest.raises(ValueError, match="odd int >= 1"):
        getattr(ops, name)(image, **kwargs)
  with pytest.raises(ValueError, match="odd height and width"):
    ops.convolve(image, np.ones((2, 3)))
  with pytest.raises(ValueError, match="border to be one of"):
    ops.box_blur(image, kernel_size=3, border="wrap")
  with pytest.raises(ValueError, match="sigma > 0"):
    ops.gaussian_blur(image, sigma=0.0)
  with pytest.raises(ValueError, match="canny: expected 1 or 3 channel"):
    ops.canny(np.zeros((8, 8, 2), np.float32))
  with pytest.raises(ValueError, match="too small"):
    ops.box_blur(np.zeros((3, 3, 1), np.float32), kernel_size=7)


def test_leading_dims_jit_and_vmap_agree():
  rng = np.random.default_rng(3)
  images = rng.random((2, 3, 16, 20, 3), dtype=np.float32)
  for name in ("rgb_to_lab", "adjust_hue", "equalize_histogram", "median_blur", "canny"):
    fn = jax.jit(lambda x, name=name: _call(name, x))
    nested = fn(images)
    flat = jax.vmap(fn)(images.reshape((6, 16, 20, 3)))
    np.testing.assert_allclose(np.asarray(nested).reshape(np.shape(flat)), flat, atol=1e-5, err_msg=name)


def test_low_precision_dtype_preserved():
  image = np.random.default_rng(4).random((1, 12, 12, 3)).astype(jnp.bfloat16)
  for name in ("rgb_to_lab", "gaussian_blur", "convolve", "bilateral_filter", "clahe", "resize", "canny"):
    assert _call(name, image).dtype == jnp.bfloat16, name
