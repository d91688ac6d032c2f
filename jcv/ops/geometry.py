"""Geometric transforms on images [..., H, W, C]: resize, crops, flips, rotations and affine warps.

Thin wrappers over ``jax.image`` and dm-pix that accept any leading batch dimensions.
"""
import functools

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from jcv.ops import _checks

__all__ = ["resize", "crop", "center_crop", "flip_left_right", "flip_up_down", "rot90", "rotate",
           "affine_transform"]

_RESIZE_METHODS = ("nearest", "linear", "cubic", "lanczos3", "lanczos5")
# Border modes of affine_transform (scipy.ndimage names; "wrap" acts as scipy's "grid-wrap").
AFFINE_MODES = ("nearest", "constant", "reflect", "wrap")


@functools.partial(jax.jit, static_argnames=("order", "mode", "cval"))
def _affine_batch(images, matrices, *, order, mode, cval):
  # Compiled even when called eagerly: dm-pix's interpolation is hundreds of small ops.
  def one(image, m):
    # dm-pix warps [H, W, C] with a 3-D homogeneous matrix; the channel axis maps to itself.
    full = jnp.zeros((3, 4), m.dtype).at[:2, :2].set(m[:, :2]).at[:2, 3].set(m[:, 2]).at[2, 2].set(1)
    return pix.affine_transform(image, full, order=order, mode=mode, cval=cval)

  return jax.vmap(one)(images, matrices)


def resize(image, *, height, width, method="linear", antialias=True):
  """Resizes the spatial axes with ``jax.image.resize``'s kernels (half-pixel centres).

  The weights are exactly ``jax.image.resize``'s, applied separably as a few taps per output
  pixel (much faster on CPU than its dense contraction); "nearest" calls it directly.

  Upsampling with "linear" equals OpenCV ``cv2.resize(..., INTER_LINEAR)``; downsampling with
  ``antialias=True`` widens the kernel like PIL's ``Image.resize`` (BILINEAR/BICUBIC). Edges
  are handled by renormalising the kernel weights inside the image.
  """
  image = _checks.check_image(image, op="resize")
  if method not in _RESIZE_METHODS:
    raise ValueError(f"resize: expected method in {_RESIZE_METHODS}; got {method!r}.")
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"resize: expected {name} to be an int >= 1; got {value!r}.")
  return _resize(image, height=int(height), width=int(width), method=method, antialias=bool(antialias))


@functools.partial(jax.jit, static_argnames=("height", "width", "method", "antialias"))
def _resize(image, *, height, width, method, antialias):
  if method == "nearest":
    shape = image.shape[:-3] + (height, width, image.shape[-1])
    return jax.image.resize(image, shape, method=method, antialias=antialias)
  # jax.image.resize contracts with dense [out, in] weight matrices (O(in * out) per line, slow
  # on CPU); the same weights applied as a few gathered taps per output cost O(out * taps).
  out = image
  for axis, size in ((-3, height), (-2, width)):
    if out.shape[axis] != size:
      out = _resize_axis(out, axis, *_resize_taps(out.shape[axis], size, method, antialias))
  return out


_dense_resize = jax.jit(jax.image.resize, static_argnames=("shape", "method", "antialias"))


@functools.lru_cache(maxsize=64)
def _resize_taps(in_size, out_size, method, antialias):
  """jax.image.resize's 1-D weights as (indices [out, taps], weights [out, taps]) numpy arrays."""
  with jax.ensure_compile_time_eval():
    dense = np.asarray(_dense_resize(np.eye(in_size, dtype=np.float32), shape=(in_size, out_size),
                                     method=method, antialias=antialias))  # [in, out]
  nonzero = dense != 0
  first = np.argmax(nonzero, axis=0)
  last = in_size - 1 - np.argmax(nonzero[::-1], axis=0)
  taps = int(np.max(last - first + 1))
  indices = first[:, None] + np.arange(taps)[None, :]
  valid = indices <= last[:, None]
  indices = np.minimum(indices, in_size - 1)
  weights = np.where(valid, dense[indices, np.arange(out_size)[:, None]], 0.0).astype(np.float32)
  return indices, weights


def _resize_axis(image, axis, indices, weights):
  shape = [1] * image.ndim
  shape[axis] = weights.shape[0]
  out = None
  for k in range(weights.shape[1]):
    part = jnp.take(image, indices[:, k], axis=axis) * jnp.asarray(weights[:, k].reshape(shape), image.dtype)
    out = part if out is None else out + part
  return out


def crop(image, *, top, left, height, width):
  """Crops ``[top:top + height, left:left + width]``; ``top``/``left`` may be traced.

  Offsets are clamped so the window stays inside the image (``jax.lax.dynamic_slice``).
  """
  image = _checks.check_image(image, op="crop", min_ndim=3)
  if height > image.shape[-3] or width > image.shape[-2]:
    raise ValueError(
        f"crop: expected height <= {image.shape[-3]} and width <= {image.shape[-2]}; "
        f"got {height}x{width}.")
  starts = [0] * (image.ndim - 3) + [top, left, 0]
  sizes = image.shape[:-3] + (height, width, image.shape[-1])
  return jax.lax.dynamic_slice(image, [jnp.asarray(s, jnp.int32) for s in starts], sizes)


def center_crop(image, *, height, width):
  """Central ``height x width`` window (odd margins leave the extra pixel bottom/right; dm-pix)."""
  image = _checks.check_image(image, op="center_crop")
  lead = image.shape[:-3]
  flat = image.reshape((-1,) + image.shape[-3:])
  out = pix.center_crop(flat, height, width)
  return out.reshape(lead + out.shape[-3:])


def flip_left_right(image):
  """Mirrors the width axis (dm-pix)."""
  image = _checks.check_image(image, op="flip_left_right")
  return pix.flip_left_right(image)


def flip_up_down(image):
  """Mirrors the height axis (dm-pix)."""
  image = _checks.check_image(image, op="flip_up_down")
  return pix.flip_up_down(image)


def rot90(image, *, k=1):
  """Rotates by ``k`` quarter turns counter-clockwise (dm-pix, as ``np.rot90``)."""
  image = _checks.check_image(image, op="rot90")
  return pix.rot90(image, k)


def rotate(image, *, angle, order=1, mode="nearest", cval=0.0):
  """Rotates counter-clockwise by ``angle`` radians about the image centre (dm-pix).

  ``order`` 0 (nearest) or 1 (bilinear); ``mode`` "nearest" (replicate the edge, default) or
  "constant" (fill with ``cval``), as ``scipy.ndimage``. The output keeps the input size.
  """
  image = _checks.check_image(image, op="rotate")
  if order not in (0, 1):
    raise ValueError(f"rotate: expected order 0 or 1; got {order!r}.")
  if mode not in ("nearest", "constant"):
    raise ValueError(f"rotate: expected mode 'nearest' or 'constant'; got {mode!r}.")
  c, s = jnp.cos(angle), jnp.sin(angle)
  linear = jnp.array([[c, s], [-s, c]], jnp.float32)
  centre = (jnp.asarray(image.shape[-3:-1], jnp.float32) - 1) / 2
  matrix = jnp.concatenate([linear, (centre - linear @ centre)[:, None]], axis=1)
  return affine_transform(image, matrix=matrix, order=order, mode=mode, cval=cval)


def affine_transform(image, *, matrix, order=1, mode="nearest", cval=0.0):
  """Resamples with an affine map from output to input pixel coordinates (dm-pix).

  ``matrix`` [2, 3] (or [..., 2, 3], one per leading index of ``image``) maps an output
  pixel's (row, column) to the input position ``matrix[:, :2] @ (row, col) + matrix[:, 2]``,
  pixel centres at integers, as ``scipy.ndimage.affine_transform(image, matrix[:, :2],
  matrix[:, 2])``. ``order`` 0 (nearest) or 1 (bilinear). ``mode`` fills positions outside
  the image: "nearest" (edge pixel), "constant" (``cval``), "reflect" (``dcba|abcd|dcba``) or
  "wrap" (``abcd|abcd|abcd``, scipy's "grid-wrap"); "nearest" and "constant" are the fast ones
  on accelerators. The output keeps the input size.
  """
  image = _checks.check_image(image, op="affine_transform")
  if order not in (0, 1):
    raise ValueError(f"affine_transform: expected order 0 or 1; got {order!r}.")
  if mode not in AFFINE_MODES:
    raise ValueError(f"affine_transform: expected mode in {AFFINE_MODES}; got {mode!r}.")
  matrix = jnp.asarray(matrix, jnp.float32)
  lead = image.shape[:-3]
  if matrix.shape[-2:] != (2, 3) or matrix.shape[:-2] not in ((), lead):
    raise ValueError(f"affine_transform: expected matrix of shape [2, 3] or {list(lead) + [2, 3]}; "
                     f"got {list(matrix.shape)}.")
  flat = image.reshape((-1,) + image.shape[-3:])
  matrices = jnp.broadcast_to(matrix, lead + (2, 3)).reshape(-1, 2, 3)
  out = _affine_batch(flat, matrices, order=order, mode=mode, cval=float(cval))  # cval: a number
  return out.reshape(image.shape)
