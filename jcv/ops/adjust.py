"""Colour processing on float RGB images [..., H, W, C] in [0, 1].

The photometric adjustments wrap dm-pix (same maths as ``tf.image.adjust_*``); they do not
clip, so results may leave [0, 1] (clip with ``jnp.clip`` where needed). `auto_contrast`
and `gray_world_balance` are per-image statistics over the spatial axes. All are
jit/vmap/grad-able.
"""
import dm_pix as pix
import jax.numpy as jnp

from jcv.ops import _checks

__all__ = [
    "adjust_brightness", "adjust_contrast", "adjust_gamma", "adjust_saturation",
    "adjust_hue", "auto_contrast", "gray_world_balance",
]


def adjust_brightness(image, *, delta):
  """Adds ``delta`` to every channel (dm-pix): ``image + delta`` (not clipped)."""
  image = _checks.check_image(image, op="adjust_brightness")
  return pix.adjust_brightness(image, delta)


def adjust_contrast(image, *, factor):
  """Scales each channel's distance to its spatial mean (dm-pix): ``mean + factor (x - mean)``."""
  image = _checks.check_image(image, op="adjust_contrast")
  return pix.adjust_contrast(image, factor)


def adjust_gamma(image, *, gamma, gain=1.0):
  """Gamma correction (dm-pix): ``gain * clip(image, 0, 1) ** gamma``, as scikit-image."""
  image = _checks.check_image(image, op="adjust_gamma")
  _checks.check_positive(gamma, op="adjust_gamma", name="gamma")
  return pix.adjust_gamma(image, gamma, gain=gain)


def adjust_saturation(image, *, factor):
  """Multiplies the HSV saturation by ``factor`` (clipped to [0, 1]) and converts back (dm-pix)."""
  image = _checks.check_image(image, op="adjust_saturation", channels=3)
  return pix.adjust_saturation(image, factor)


def adjust_hue(image, *, delta):
  """Rotates the HSV hue by ``delta`` turns (0.5 = 180 degrees), wrapping modulo 1 (dm-pix)."""
  image = _checks.check_image(image, op="adjust_hue", channels=3)
  return pix.adjust_hue(image, delta)


def auto_contrast(image):
  """Stretches each channel linearly so its minimum maps to 0 and its maximum to 1.

  Per image and channel over the spatial axes, as ``cv2.normalize(..., 0, 1, NORM_MINMAX)``;
  a constant channel is returned unchanged.
  """
  image = _checks.check_image(image, op="auto_contrast")
  low = jnp.min(image, axis=(-3, -2), keepdims=True)
  high = jnp.max(image, axis=(-3, -2), keepdims=True)
  span = high - low
  safe = jnp.where(span > 0, span, 1.0)
  return jnp.where(span > 0, (image - low) / safe, image)


def gray_world_balance(image):
  """Grey-world white balance: scales each channel so its mean equals the mean over channels.

  Gains are ``mean(channel means) / channel mean`` per image; the result is clipped to [0, 1]
  (so highlights saturate rather than leave the range). An all-black channel keeps gain 1.
  """
  image = _checks.check_image(image, op="gray_world_balance")
  means = jnp.mean(image, axis=(-3, -2), keepdims=True)
  target = jnp.mean(means, axis=-1, keepdims=True)
  safe = jnp.where(means > 0, means, 1.0)
  gains = jnp.where(means > 0, target / safe, 1.0)
  return jnp.clip(image * gains, 0.0, 1.0)
