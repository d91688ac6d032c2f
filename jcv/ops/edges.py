"""Canny edge detection on float images [..., H, W, 1 or 3] in [0, 1]."""
import jax
import jax.numpy as jnp

from jcv.ops import _checks
from jcv.ops import color
from jcv.ops import filters

__all__ = ["canny"]

# OpenCV's fixed-point tan(22.5 deg) = 13573 / 2^15; tan(67.5 deg) = 1 / tan(22.5 deg) = 1 + 2 tan(22.5).
_TAN22 = 13573.0 / 32768.0
_TAN67 = (13573.0 + 65536.0) / 32768.0
# Magnitudes within this relative distance count as equal, so float32 rounding does not decide
# ties; on uint8-derived images this reproduces OpenCV's integer comparisons.
_TIE = 1e-5


def _greater(a, b):
  return a > b * (1 + _TIE)


def _greater_equal(a, b):
  return a >= b * (1 - _TIE)


def _neighbours(mag):
  """(up, down, left, right, up_left, up_right, down_left, down_right), zero outside the image."""
  height, width = mag.shape[-3], mag.shape[-2]
  p = _checks.pad_spatial(mag, 1, 1, mode="constant")

  def at(dy, dx):
    return p[..., 1 + dy:1 + dy + height, 1 + dx:1 + dx + width, :]

  return (at(-1, 0), at(1, 0), at(0, -1), at(0, 1), at(-1, -1), at(-1, 1), at(1, -1), at(1, 1))


def _dilate(mask):
  """3x3 binary dilation (8-connectivity), zero outside the image."""
  out = mask
  for n in _neighbours(mask):
    out = out | n
  return out


def canny(image, *, low_threshold=0.2, high_threshold=0.5, sigma=1.0, l2_gradient=False):
  """Canny edges as a 0/1 mask [..., H, W, 1], following OpenCV ``cv2.Canny``.

  Steps: RGB is reduced to BT.601 luma first (OpenCV instead keeps the largest per-channel
  gradient); an optional Gaussian blur (``sigma`` > 0; ``sigma=0`` skips it, as cv2.Canny,
  which does not blur); 3x3 Sobel gradients with "edge" (replicate) borders as OpenCV; gradient
  magnitude ``|dx| + |dy|`` (or ``sqrt(dx^2 + dy^2)`` with ``l2_gradient``); non-maximum
  suppression along the gradient direction quantised to 0/45/90/135 degrees (OpenCV's
  tie-breaking, zero magnitude outside the image; magnitudes within a relative 1e-5 count as
  equal so float32 rounding does not break ties); hysteresis: pixels above
  ``high_threshold`` seed edges that grow through 8-connected pixels above ``low_threshold``.

  Thresholds are in gradient units of a [0, 1] image: OpenCV's uint8 thresholds divided by 255
  (``cv2.Canny(u8, 50, 150)`` ~ ``canny(u8 / 255, low_threshold=50/255, high_threshold=150/255,
  sigma=0)``). Not differentiable (a binary mask).
  """
  image = _checks.check_image(image, op="canny", channels=(1, 3))
  if low_threshold > high_threshold:
    raise ValueError(
        f"canny: expected low_threshold <= high_threshold; got {low_threshold} > {high_threshold}.")
  gray = color.rgb_to_grayscale(image) if image.shape[-1] == 3 else image
  if sigma > 0:
    gray = filters.gaussian_blur(gray, sigma=sigma)
  dx, dy = filters.sobel(gray, border="edge")
  if l2_gradient:
    mag, low, high = dx * dx + dy * dy, low_threshold ** 2, high_threshold ** 2
  else:
    mag, low, high = jnp.abs(dx) + jnp.abs(dy), low_threshold, high_threshold
  up, down, left, right, up_left, up_right, down_left, down_right = _neighbours(mag)
  ax, ay = jnp.abs(dx), jnp.abs(dy)
  horizontal = ay < ax * _TAN22
  vertical = ay > ax * _TAN67
  same_sign = (dx < 0) == (dy < 0)
  diag_a = jnp.where(same_sign, up_left, up_right)
  diag_b = jnp.where(same_sign, down_right, down_left)
  is_max = jnp.where(
      horizontal, _greater(mag, left) & _greater_equal(mag, right),
      jnp.where(vertical, _greater(mag, up) & _greater_equal(mag, down),
                _greater(mag, diag_a) & _greater(mag, diag_b)))
  weak = is_max & _greater(mag, low)
  strong = weak & _greater(mag, high)

  def grow(state):
    edges, _ = state
    new = edges
    for _ in range(4):  # several dilation steps per convergence check
      new = _dilate(new) & weak
    return new, jnp.any(new != edges)

  edges, _ = jax.lax.while_loop(lambda s: s[1], grow, (strong, jnp.array(True)))
  return edges.astype(image.dtype)
