"""Random affine augmentation on the device, as Keras ``ImageDataGenerator`` offers it:
rotation, shift, zoom and shear composed into one matrix per image, so each image is
resampled once (bilinear, :func:`jcv.ops.geometry.affine_transform` over dm-pix).

The forward map (input to output) about the image centre ``c`` is
``out = c + shift + R(angle) @ Shear(shear) @ zoom * (in - c)``: zoom scales the content
(> 1 enlarges it), the shear is horizontal (``x += tan(shear) * y``), the rotation is
counter-clockwise on screen, the shift moves the content right/down. Each image draws its
own parameters from one uniform draw of ``key`` (:func:`sample_affine`); all ranges are
uniform. Float images [B, H, W, C] in and out (``make_augment`` gives floats in [0, 1]).
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from jcv.ops import geometry

__all__ = [
  "FILL_MODES", "affine_matrices", "random_affine", "random_rotation", "random_shear", "random_shift",
  "random_zoom", "sample_affine",
]

Array = jax.Array
# Keras' fill_mode names; "wrap" repeats the image (abcd|abcd|abcd).
FILL_MODES = geometry.AFFINE_MODES


def _symmetric(value, name: str, *, limit: float = math.inf) -> tuple[float, float]:
  """``x -> (-x, x)``; a pair ``(lo, hi)`` is kept. Checks ``|bounds| < limit``."""
  lo, hi = (-float(value), float(value)) if isinstance(value, numbers.Real) else map(float, value)
  if not lo <= hi or max(abs(lo), abs(hi)) >= limit:
    raise ValueError(f"{name} must be a number >= 0 or a pair lo <= hi, within (-{limit}, {limit}); got {value!r}")
  return lo, hi


def _zoom_range(zoom) -> tuple[float, float]:
  """Keras' ``zoom_range``: ``z -> (1 - z, 1 + z)``; a pair ``(lo, hi)`` is kept."""
  lo, hi = (1 - float(zoom), 1 + float(zoom)) if isinstance(zoom, numbers.Real) else map(float, zoom)
  if not 0 < lo <= hi:
    raise ValueError(f"zoom must be a number in [0, 1) or a pair 0 < lo <= hi; got {zoom!r}")
  return lo, hi


def sample_affine(
  key: Array, batch: int, *, rotation=0.0, width_shift=0.0, height_shift=0.0, zoom=0.0, shear=0.0,
) -> dict[str, Array]:
  """Per-image parameters, float32 [batch] each, uniform in the asked ranges.

  ``rotation`` and ``shear`` are degrees (``x`` means ``[-x, x]``, or a pair), the shifts are
  fractions of the width/height (``[-f, f]``), ``zoom`` is Keras' ``zoom_range`` (``z`` means
  ``[1 - z, 1 + z]``, or a pair). Returns ``angle``, ``shear`` (degrees), ``shift_x``,
  ``shift_y`` (fractions) and ``zoom`` (content scale).
  """
  ranges = {
    "angle": _symmetric(rotation, "rotation", limit=360), "shear": _symmetric(shear, "shear", limit=90),
    "shift_x": _symmetric(width_shift, "width_shift", limit=1),
    "shift_y": _symmetric(height_shift, "height_shift", limit=1), "zoom": _zoom_range(zoom),
  }
  u = jax.random.uniform(key, (batch, len(ranges)))
  return {name: lo + (hi - lo) * u[:, i] for i, (name, (lo, hi)) in enumerate(ranges.items())}


def affine_matrices(params: dict[str, Array], *, height: int, width: int) -> Array:
  """Pull matrices [B, 2, 3] (output (row, col) -> input position) of :func:`sample_affine`'s
  parameters, for :func:`jcv.ops.geometry.affine_transform`."""
  a = jnp.deg2rad(params["angle"])
  t = jnp.tan(jnp.deg2rad(params["shear"]))
  cos, sin, one, zero = jnp.cos(a), jnp.sin(a), jnp.ones_like(a), jnp.zeros_like(a)
  m = lambda rows: jnp.stack([jnp.stack(r, -1) for r in rows], -2)  # [B, 2, 2] in (row, col)
  unrotate = m([[cos, sin], [-sin, cos]])
  unshear = m([[one, zero], [-t, one]])
  linear = (unshear @ unrotate) / params["zoom"][:, None, None]
  centre = jnp.array([(height - 1) / 2, (width - 1) / 2], jnp.float32)
  shift = jnp.stack([params["shift_y"] * height, params["shift_x"] * width], -1)
  offset = centre - jnp.einsum("bij,bj->bi", linear, centre + shift)
  return jnp.concatenate([linear, offset[:, :, None]], axis=-1)


def random_affine(
  key: Array, images: Array, *, rotation=0.0, width_shift=0.0, height_shift=0.0, zoom=0.0, shear=0.0,
  fill_mode: str = "nearest", cval: float = 0.0,
) -> Array:
  """Keras-style random rotation, shift, zoom and shear per image, resampled once.

  Options as :func:`sample_affine` (``rotation_range``, ``width_shift_range``,
  ``height_shift_range``, ``zoom_range``, ``shear_range`` in Keras). ``fill_mode``: one of
  :data:`FILL_MODES` ("nearest", the default, and "constant" with ``cval`` are the fast ones
  on accelerators). Differences from Keras: the centre is ``(size - 1) / 2``, zoom > 1
  enlarges the content, one zoom factor for both axes, shear without Keras' column scaling.
  """
  if images.ndim != 4:
    raise ValueError(f"random_affine expects a batch of images [B, H, W, C]; got shape {images.shape}")
  if fill_mode not in FILL_MODES:
    raise ValueError(f"fill_mode must be one of {FILL_MODES}; got {fill_mode!r}")
  b, h, w, _ = images.shape
  params = sample_affine(key, b, rotation=rotation, width_shift=width_shift, height_shift=height_shift,
                         zoom=zoom, shear=shear)
  matrices = affine_matrices(params, height=h, width=w)
  return geometry.affine_transform(images, matrix=matrices, mode=fill_mode, cval=cval)


def random_rotation(key: Array, images: Array, *, degrees, fill_mode: str = "nearest", cval: float = 0.0) -> Array:
  """Rotation by a uniform angle in ``[-degrees, degrees]`` (or a pair), counter-clockwise > 0."""
  return random_affine(key, images, rotation=degrees, fill_mode=fill_mode, cval=cval)


def random_shift(key: Array, images: Array, *, width: float = 0.0, height: float = 0.0, fill_mode: str = "nearest",
                 cval: float = 0.0) -> Array:
  """Shift by uniform fractions ``[-width, width]`` of the width and ``[-height, height]`` of the height."""
  return random_affine(key, images, width_shift=width, height_shift=height, fill_mode=fill_mode, cval=cval)


def random_zoom(key: Array, images: Array, *, scale, fill_mode: str = "nearest", cval: float = 0.0) -> Array:
  """Zoom by a uniform content scale in ``[1 - scale, 1 + scale]`` (or a pair ``(lo, hi)``)."""
  return random_affine(key, images, zoom=scale, fill_mode=fill_mode, cval=cval)


def random_shear(key: Array, images: Array, *, degrees, fill_mode: str = "nearest", cval: float = 0.0) -> Array:
  """Horizontal shear by a uniform angle in ``[-degrees, degrees]`` (or a pair)."""
  return random_affine(key, images, shear=degrees, fill_mode=fill_mode, cval=cval)
