"""Colour-space conversions for float RGB images in [0, 1] (channel-last, any leading dims).

HSV comes from dm-pix; HLS reuses dm-pix's hue; the rest are closed-form. Every pair
round-trips within 1e-5 on in-gamut images, and all functions are jit/vmap/grad-able
(gradients are finite: divisions and powers use safe denominators/bases).
"""
import dm_pix as pix
import jax.numpy as jnp
import numpy as np

from jcv.ops import _checks

__all__ = [
    "rgb_to_grayscale", "grayscale_to_rgb",
    "rgb_to_hsv", "hsv_to_rgb",
    "rgb_to_hls", "hls_to_rgb",
    "rgb_to_ycbcr", "ycbcr_to_rgb",
    "rgb_to_xyz", "xyz_to_rgb",
    "rgb_to_lab", "lab_to_rgb",
]

# ITU-R BT.601 luma weights (OpenCV, PIL and JPEG use these exact values).
_BT601 = (0.299, 0.587, 0.114)
# Linear sRGB -> CIE XYZ (D65), the matrix scikit-image uses.
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_RGB_FROM_XYZ = np.linalg.inv(np.asarray(_XYZ_FROM_RGB, np.float64))
_D65_WHITE = (0.95047, 1.0, 1.08883)  # CIE 1931 2-degree observer, as scikit-image.


def _matmul_channels(image, matrix):
  """out[..., d] = sum_c matrix[d][c] * image[..., c], as fused elementwise float32 maths."""
  matrix = np.asarray(matrix, np.float64)
  channels = [image[..., c] for c in range(image.shape[-1])]
  rows = [sum(float(w) * x for w, x in zip(row, channels) if w != 0) for row in matrix]
  return jnp.stack(rows, axis=-1)


def rgb_to_grayscale(image, *, keep_channels=False):
  """RGB -> BT.601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (as OpenCV's COLOR_RGB2GRAY).

  Args:
    image: float RGB image(s) in [0, 1], shape [..., H, W, 3].
    keep_channels: if True, repeat the luma into 3 channels.

  Returns:
    [..., H, W, 1] (or [..., H, W, 3] with keep_channels) luma in [0, 1].

  dm-pix's ``rgb_to_grayscale`` uses TensorFlow's rounded weights (0.2989, 0.5870, 0.1140, sum
  0.9999); the exact BT.601 weights here keep white at exactly 1.
  """
  image = _checks.check_image(image, op="rgb_to_grayscale", channels=3)
  gray = _matmul_channels(image, (_BT601,))
  return jnp.repeat(gray, 3, axis=-1) if keep_channels else gray


def grayscale_to_rgb(image):
  """Repeats a one-channel image [..., H, W, 1] into three identical RGB channels."""
  image = _checks.check_image(image, op="grayscale_to_rgb", channels=1)
  return jnp.repeat(image, 3, axis=-1)


def rgb_to_hsv(image):
  """RGB -> HSV (dm-pix): hue as a fraction of a turn in [0, 1), saturation and value in [0, 1].

  Matches scikit-image ``rgb2hsv``; OpenCV's float HSV is the same with hue in degrees.
  """
  image = _checks.check_image(image, op="rgb_to_hsv", channels=3)
  return pix.rgb_to_hsv(image)


def hsv_to_rgb(image):
  """HSV -> RGB (dm-pix), the inverse of `rgb_to_hsv` (hue wraps modulo 1)."""
  image = _checks.check_image(image, op="hsv_to_rgb", channels=3)
  return pix.hsv_to_rgb(image)


def rgb_to_hls(image):
  """RGB -> HLS with channels (hue, lightness, saturation), all in [0, 1], hue in turns.

  Same channel order and definitions as Python's ``colorsys`` and OpenCV's COLOR_RGB2HLS
  (OpenCV's float hue is in degrees). Hue is dm-pix's HSV hue. Grey pixels get hue 0, saturation 0.
  """
  image = _checks.check_image(image, op="rgb_to_hls", channels=3)
  hue = pix.rgb_to_hsv(image)[..., 0]
  red, green, blue = image[..., 0], image[..., 1], image[..., 2]
  high = jnp.maximum(jnp.maximum(red, green), blue)
  low = jnp.minimum(jnp.minimum(red, green), blue)
  lightness = (high + low) / 2
  chroma = high - low
  denom = 1 - jnp.abs(2 * lightness - 1)
  safe = jnp.where(denom > 0, denom, 1.0)
  saturation = jnp.where((chroma > 0) & (denom > 0), chroma / safe, 0.0)
  return jnp.stack([hue, lightness, saturation], axis=-1)


def hls_to_rgb(image):
  """HLS (hue, lightness, saturation) -> RGB, the inverse of `rgb_to_hls`."""
  image = _checks.check_image(image, op="hls_to_rgb", channels=3)
  hue, lightness, saturation = image[..., 0], image[..., 1], image[..., 2]
  value = lightness + saturation * jnp.minimum(lightness, 1 - lightness)
  safe_value = jnp.where(value > 0, value, 1.0)
  hsv_saturation = jnp.where(value > 0, 2 * (1 - lightness / safe_value), 0.0)
  return pix.hsv_to_rgb(jnp.stack([hue, hsv_saturation, value], axis=-1))


_YCBCR_FROM_RGB = ((0.299, 0.587, 0.114),
                   (-0.168735892, -0.331264108, 0.5),
                   (0.5, -0.418687589, -0.081312411))


def rgb_to_ycbcr(image):
  """RGB -> full-range BT.601 YCbCr as in JPEG/JFIF, channels (Y, Cb, Cr), chroma offset 0.5.

  Equals OpenCV's float COLOR_RGB2YCrCb with the last two channels swapped. Y is in [0, 1];
  Cb and Cr are in [0, 1] for RGB in [0, 1].
  """
  image = _checks.check_image(image, op="rgb_to_ycbcr", channels=3)
  offset = jnp.asarray([0.0, 0.5, 0.5], image.dtype)
  return _matmul_channels(image, _YCBCR_FROM_RGB) + offset


def ycbcr_to_rgb(image):
  """Full-range BT.601 YCbCr (Y, Cb, Cr) -> RGB, the inverse of `rgb_to_ycbcr` (no clipping)."""
  image = _checks.check_image(image, op="ycbcr_to_rgb", channels=3)
  y, cb, cr = image[..., 0], image[..., 1] - 0.5, image[..., 2] - 0.5
  red = y + 1.402 * cr
  green = y - 0.344136286 * cb - 0.714136286 * cr
  blue = y + 1.772 * cb
  return jnp.stack([red, green, blue], axis=-1)


def _srgb_to_linear(c):
  safe = jnp.maximum(c, 0.04045)
  return jnp.where(c > 0.04045, ((safe + 0.055) / 1.055) ** 2.4, c / 12.92)


def _linear_to_srgb(c):
  safe = jnp.maximum(c, 0.0031308)
  return jnp.where(c > 0.0031308, 1.055 * safe ** (1 / 2.4) - 0.055, c * 12.92)


def rgb_to_xyz(image):
  """sRGB -> CIE XYZ (D65), with the sRGB transfer curve undone first (as scikit-image ``rgb2xyz``).

  Y is relative luminance in [0, 1]; white maps to (0.9505, 1.0, 1.0888).
  """
  image = _checks.check_image(image, op="rgb_to_xyz", channels=3)
  return _matmul_channels(_srgb_to_linear(image), _XYZ_FROM_RGB)


def xyz_to_rgb(image):
  """CIE XYZ (D65) -> sRGB, the inverse of `rgb_to_xyz`.

  Out-of-gamut colours are not clipped (scikit-image's ``xyz2rgb`` clips to [0, 1]).
  """
  image = _checks.check_image(image, op="xyz_to_rgb", channels=3)
  return _linear_to_srgb(_matmul_channels(image, _RGB_FROM_XYZ))


def rgb_to_lab(image):
  """sRGB -> CIE L*a*b* (D65, 2-degree): L in [0, 100], a and b roughly in [-128, 128].

  Same constants as scikit-image ``rgb2lab`` (cube root above 0.008856, linear 7.787 t + 16/116
  below).
  """
  image = _checks.check_image(image, op="rgb_to_lab", channels=3)
  xyz = _matmul_channels(_srgb_to_linear(image), _XYZ_FROM_RGB)
  t = xyz / jnp.asarray(_D65_WHITE, image.dtype)
  safe = jnp.maximum(t, 0.008856)
  f = jnp.where(t > 0.008856, jnp.cbrt(safe), 7.787 * t + 16.0 / 116.0)
  fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
  return jnp.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


def lab_to_rgb(image):
  """CIE L*a*b* (D65) -> sRGB, the inverse of `rgb_to_lab` (out-of-gamut colours not clipped)."""
  image = _checks.check_image(image, op="lab_to_rgb", channels=3)
  fy = (image[..., 0] + 16.0) / 116.0
  fx = fy + image[..., 1] / 500.0
  fz = fy - image[..., 2] / 200.0
  f = jnp.stack([fx, fy, fz], axis=-1)
  t = jnp.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
  xyz = t * jnp.asarray(_D65_WHITE, image.dtype)
  return _linear_to_srgb(_matmul_channels(xyz, _RGB_FROM_XYZ))
