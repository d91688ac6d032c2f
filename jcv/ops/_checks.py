"""Input validation and shape helpers shared by the jcv.ops modules (private)."""
import jax.numpy as jnp
import numpy as np

__all__ = ["BORDERS", "check_border", "check_image", "check_kernel_size", "check_positive", "pad_spatial"]

BORDERS = ("reflect", "symmetric", "edge", "constant")
# Border name -> the jnp.pad mode that implements it.
_PAD_MODES = {"reflect": "reflect", "symmetric": "symmetric", "edge": "edge", "constant": "constant"}


def check_image(image, *, op, channels=None, min_ndim=3):
  """Returns `image` as a float jnp array after checking dtype, rank and channel count."""
  dtype = getattr(image, "dtype", None)
  if dtype is None:
    image = np.asarray(image)
    dtype = image.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{op}: expected a floating-point image with values in [0, 1]; got dtype {dtype}. "
        "Convert first, e.g. image.astype(jnp.float32) / 255.")
  if np.ndim(image) < min_ndim:
    raise ValueError(
        f"{op}: expected an image of shape [..., height, width, channels] (channel-last, "
        f"at least {min_ndim} dimensions); got shape {tuple(np.shape(image))}.")
  if channels is not None:
    allowed = (channels,) if isinstance(channels, int) else tuple(channels)
    if np.shape(image)[-1] not in allowed:
      want = " or ".join(str(c) for c in allowed)
      raise ValueError(
          f"{op}: expected {want} channel(s) in the last axis; got shape {tuple(np.shape(image))}.")
  return jnp.asarray(image)


def check_kernel_size(kernel_size, *, op, name="kernel_size"):
  """Returns `kernel_size` as a python int after checking it is odd and >= 1."""
  if isinstance(kernel_size, (bool, np.bool_)) or not isinstance(kernel_size, (int, np.integer)):
    raise ValueError(f"{op}: expected {name} to be an odd int >= 1; got {kernel_size!r}.")
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"{op}: expected {name} to be an odd int >= 1; got {kernel_size}.")
  return int(kernel_size)


def check_border(border, *, op):
  """Returns the jnp.pad mode for a border name, or raises a ValueError listing the choices."""
  if border not in _PAD_MODES:
    raise ValueError(f"{op}: expected border to be one of {BORDERS}; got {border!r}.")
  return _PAD_MODES[border]


def check_positive(value, *, op, name):
  """Checks that a python number is > 0 (traced values are passed through unchecked)."""
  if isinstance(value, (int, float, np.number)) and not value > 0:
    raise ValueError(f"{op}: expected {name} > 0; got {value}.")
  return value


def pad_spatial(image, pad_h, pad_w, *, mode):
  """Pads the two spatial axes ([..., H, W, C] layout) of `image` with a jnp.pad mode."""
  widths = [(0, 0)] * (image.ndim - 3) + [(pad_h, pad_h), (pad_w, pad_w), (0, 0)]
  if image.shape[-3] <= pad_h or image.shape[-2] <= pad_w:
    if mode in ("reflect", "symmetric"):
      raise ValueError(
          f"image of shape {tuple(image.shape)} is too small for a {2 * pad_h + 1}x{2 * pad_w + 1} "
          f"window with border={mode!r}; use a smaller kernel or border='edge'.")
  return jnp.pad(image, widths, mode=mode)
