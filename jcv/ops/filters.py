"""Linear and non-linear spatial filters on float images [..., H, W, C], channels independent.

Border handling (``border=``): "reflect" mirrors without repeating the edge pixel
(``dcb|abcd|cba``, OpenCV's BORDER_REFLECT_101 / BORDER_DEFAULT, numpy "reflect"),
"symmetric" mirrors with it (``dcba|abcd|dcba``, OpenCV BORDER_REFLECT, scipy "reflect"),
"edge" repeats it (``aaa|abcd|ddd``, BORDER_REPLICATE) and "constant" pads zeros. The
defaults follow OpenCV's defaults for the same function, so results match OpenCV.

Filters are computed as sums of shifted slices (separable ones as two 1-D passes): on CPU
this fuses into one loop and is ~8x faster than dm-pix's depthwise-convolution
``gaussian_blur`` (which also only zero-pads), so jcv does not wrap that one.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jcv.ops import _checks

__all__ = [
    "convolve", "box_blur", "gaussian_blur", "gaussian_kernel", "median_blur",
    "bilateral_filter", "sobel", "laplacian", "unsharp_mask",
]

_MAX_SHIFTED_TERMS = 81  # Larger dense 2-D kernels go through lax.conv instead.


def _is_static(weights):
  return isinstance(weights, np.ndarray)


def _correlate_separable(image, kernel_y, kernel_x, mode):
  """Cross-correlates [..., H, W, C] with the outer product kernel_y (rows) x kernel_x (cols)."""
  ry, rx = len(kernel_y) // 2, len(kernel_x) // 2
  height, width = image.shape[-3], image.shape[-2]
  padded = _checks.pad_spatial(image, ry, rx, mode=mode)
  rows = _weighted_sum(
      [padded[..., i:i + height, :, :] for i in range(len(kernel_y))], kernel_y)
  return _weighted_sum([rows[..., :, j:j + width, :] for j in range(len(kernel_x))], kernel_x)


def _weighted_sum(terms, weights):
  total = None
  static = _is_static(weights)
  for term, weight in zip(terms, weights):
    if static and weight == 0:
      continue
    # Python floats are weakly typed, so float16/bfloat16 images keep their dtype.
    part = term if (static and weight == 1) else term * (float(weight) if static else weight)
    total = part if total is None else total + part
  return total if total is not None else jnp.zeros_like(terms[0])


def _correlate2d(image, kernel, mode):
  """Cross-correlates every channel of [..., H, W, C] with a 2-D [kh, kw] kernel."""
  kh, kw = kernel.shape
  height, width = image.shape[-3], image.shape[-2]
  padded = _checks.pad_spatial(image, kh // 2, kw // 2, mode=mode)
  if kh * kw <= _MAX_SHIFTED_TERMS:
    terms, weights = [], []
    for i in range(kh):
      for j in range(kw):
        terms.append(padded[..., i:i + height, j:j + width, :])
        weights.append(kernel[i, j])
    weights = np.asarray(weights) if _is_static(kernel) else jnp.stack(weights)
    return _weighted_sum(terms, weights)
  # Channels go into the batch so one single-channel convolution serves every channel.
  lead, (ph, pw, channels) = padded.shape[:-3], padded.shape[-3:]
  flat = jnp.moveaxis(padded.reshape((-1, ph, pw, channels)), -1, 1).reshape((-1, ph, pw, 1))
  rhs = jnp.asarray(kernel, image.dtype)[:, :, None, None]
  out = jax.lax.conv_general_dilated(
      flat, rhs, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  out = jnp.moveaxis(out.reshape((-1, channels, height, width)), 1, -1)
  return out.reshape(lead + (height, width, channels))


def convolve(image, kernel, *, border="reflect"):
  """Convolves every channel with a 2-D kernel (true convolution: the kernel is flipped).

  Equals ``scipy.ndimage.convolve`` per channel, and OpenCV ``cv2.filter2D`` (a correlation)
  with the flipped kernel ``kernel[::-1, ::-1]``.

  Args:
    image: float image(s) [..., H, W, C].
    kernel: [kh, kw] weights with odd kh and kw, centred; may be a traced array.
    border: "reflect" (default, OpenCV BORDER_DEFAULT), "symmetric", "edge" or "constant".

  Returns:
    The filtered image, same shape and dtype.
  """
  image = _checks.check_image(image, op="convolve")
  mode = _checks.check_border(border, op="convolve")
  if np.ndim(kernel) != 2 or any(s % 2 == 0 for s in np.shape(kernel)):
    raise ValueError(
        f"convolve: expected a 2-D kernel with odd height and width; got shape {np.shape(kernel)}.")
  if isinstance(kernel, (list, tuple, np.ndarray)):
    kernel = np.asarray(kernel, np.float64)[::-1, ::-1]
  else:
    kernel = jnp.asarray(kernel, image.dtype)[::-1, ::-1]
  return _correlate2d(image, kernel, mode)


def box_blur(image, *, kernel_size, border="reflect"):
  """Mean over a ``kernel_size x kernel_size`` window (OpenCV ``cv2.blur``, normalised box).

  Border: "reflect" by default (OpenCV BORDER_DEFAULT); see the module docstring.
  """
  image = _checks.check_image(image, op="box_blur")
  size = _checks.check_kernel_size(kernel_size, op="box_blur")
  mode = _checks.check_border(border, op="box_blur")
  weights = np.full(size, 1.0 / size)
  return _correlate_separable(image, weights, weights, mode)


def gaussian_kernel(*, sigma, kernel_size):
  """1-D normalised Gaussian weights of odd length ``kernel_size`` (OpenCV getGaussianKernel)."""
  size = _checks.check_kernel_size(kernel_size, op="gaussian_kernel")
  _checks.check_positive(sigma, op="gaussian_kernel", name="sigma")
  x = np.arange(size) - size // 2
  if isinstance(sigma, (int, float, np.number)):
    weights = np.exp(-(x ** 2) / (2.0 * float(sigma) ** 2))
    return weights / weights.sum()
  weights = jnp.exp(-(jnp.asarray(x, jnp.float32) ** 2) / (2.0 * sigma ** 2))
  return weights / jnp.sum(weights)


def _default_gaussian_size(sigma, op):
  if not isinstance(sigma, (int, float, np.number)):
    raise ValueError(f"{op}: kernel_size is required when sigma is a traced value.")
  # OpenCV's rule for float images: about +-4 sigma, rounded up to odd.
  return int(round(float(sigma) * 8 + 1)) | 1


def gaussian_blur(image, *, sigma, kernel_size=None, border="reflect"):
  """Gaussian blur with standard deviation ``sigma`` (pixels), separable.

  Matches ``cv2.GaussianBlur(image, (k, k), sigma)`` on float images. ``kernel_size``
  defaults to OpenCV's choice for float images, ``round(8 sigma + 1) | 1`` (about +-4 sigma).
  ``sigma`` may be traced (then ``kernel_size`` must be given). Border: "reflect" by default
  (OpenCV BORDER_DEFAULT); see the module docstring.
  """
  image = _checks.check_image(image, op="gaussian_blur")
  mode = _checks.check_border(border, op="gaussian_blur")
  if kernel_size is None:
    _checks.check_positive(sigma, op="gaussian_blur", name="sigma")
    kernel_size = _default_gaussian_size(sigma, "gaussian_blur")
  size = _checks.check_kernel_size(kernel_size, op="gaussian_blur")
  weights = gaussian_kernel(sigma=sigma, kernel_size=size)
  return _correlate_separable(image, weights, weights, mode)


@functools.lru_cache(maxsize=None)
def _sorting_network(n):
  """Comparator pairs (i, j), i < j, of Batcher's odd-even merge sort for n inputs."""
  size = 1 << max(n - 1, 0).bit_length()
  pairs = []
  p = 1
  while p < size:
    k = p
    while k >= 1:
      for j in range(k % p, size - k, 2 * k):
        for i in range(min(k, size - j - k)):
          if (i + j) // (2 * p) == (i + j + k) // (2 * p):
            pairs.append((i + j, i + j + k))
      k //= 2
    p *= 2
  # Inputs beyond n act as +inf, so comparators that touch them are no-ops.
  return tuple((i, j) for i, j in pairs if j < n)


def median_blur(image, *, kernel_size, border="edge"):
  """Median over a ``kernel_size x kernel_size`` window, per channel (OpenCV ``cv2.medianBlur``).

  Border: "edge" (replicate) by default, which is what OpenCV's medianBlur uses. The median
  is taken with min/max only: for 3x3 from column-sorted triples shared between neighbouring
  windows, otherwise with a sorting network that XLA fuses and prunes to the middle output.
  Gradients flow to the selected (median) pixel, shared equally among exact ties.
  """
  image = _checks.check_image(image, op="median_blur")
  size = _checks.check_kernel_size(kernel_size, op="median_blur")
  mode = _checks.check_border(border, op="median_blur")
  padded = _checks.pad_spatial(image, size // 2, size // 2, mode=mode)
  return _median_window(padded, size)


def _windows(padded, size):
  height, width = padded.shape[-3] - size + 1, padded.shape[-2] - size + 1
  return [padded[..., i:i + height, j:j + width, :] for i in range(size) for j in range(size)]


def _median3(a, b, c):
  return jnp.maximum(jnp.minimum(a, b), jnp.minimum(jnp.maximum(a, b), c))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _median_window(padded, size):
  """Median of every size x size window of an already padded [..., H + 2r, W + 2r, C] array."""
  if size == 3:
    # Sort each vertical triple once (shared by the three windows that contain it); the median
    # of 9 is then med3(max of the lows, median of the mids, min of the highs).
    height, width = padded.shape[-3] - 2, padded.shape[-2] - 2
    a, b, c = (padded[..., i:i + height, :, :] for i in range(3))
    low1, high1 = jnp.minimum(a, b), jnp.maximum(a, b)
    low, high = jnp.minimum(low1, c), jnp.maximum(high1, c)
    mid = jnp.maximum(low1, jnp.minimum(high1, c))
    cols = lambda x: [x[..., :, j:j + width, :] for j in range(3)]  # noqa: E731
    max_low = functools.reduce(jnp.maximum, cols(low))
    min_high = functools.reduce(jnp.minimum, cols(high))
    return _median3(max_low, _median3(*cols(mid)), min_high)
  values = _windows(padded, size)
  for i, j in _sorting_network(len(values)):
    values[i], values[j] = jnp.minimum(values[i], values[j]), jnp.maximum(values[i], values[j])
  return values[len(values) // 2]


@_median_window.defjvp
def _median_window_jvp(size, primals, tangents):
  # The median's derivative is that of the selected input (averaged over exact ties); a
  # custom rule keeps XLA from differentiating the whole sorting network (slow to compile).
  (padded,), (tangent,) = primals, tangents
  out = _median_window(padded, size)
  hits = [(v == out).astype(out.dtype) for v in _windows(padded, size)]
  count = functools.reduce(jnp.add, hits)
  weighted = [h * t for h, t in zip(hits, _windows(tangent, size))]
  return out, functools.reduce(jnp.add, weighted) / count


def bilateral_filter(image, *, kernel_size, sigma_color, sigma_space, border="reflect"):
  """Edge-preserving bilateral filter, as OpenCV ``cv2.bilateralFilter`` on float images.

  Each output pixel is the normalised sum over the window offsets (dy, dx) with
  ``dy^2 + dx^2 <= (kernel_size // 2)^2`` (a disc, as OpenCV) of
  ``exp(-(dy^2 + dx^2) / (2 sigma_space^2)) * exp(-d^2 / (2 sigma_color^2)) * neighbour``,
  where ``d`` is the L1 colour distance summed over channels (OpenCV's choice).

  Args:
    image: float image(s) [..., H, W, C] in [0, 1] (sigma_color is in the same units).
    kernel_size: odd window diameter.
    sigma_color: range sigma (> 0).
    sigma_space: spatial sigma in pixels (> 0).
    border: "reflect" by default (OpenCV BORDER_DEFAULT); see the module docstring.
  """
  image = _checks.check_image(image, op="bilateral_filter")
  size = _checks.check_kernel_size(kernel_size, op="bilateral_filter")
  mode = _checks.check_border(border, op="bilateral_filter")
  _checks.check_positive(sigma_color, op="bilateral_filter", name="sigma_color")
  _checks.check_positive(sigma_space, op="bilateral_filter", name="sigma_space")
  r = size // 2
  height, width = image.shape[-3], image.shape[-2]
  padded = _checks.pad_spatial(image, r, r, mode=mode)
  color_coeff = -0.5 / (sigma_color * sigma_color)
  space_coeff = -0.5 / (sigma_space * sigma_space)
  channels = image.shape[-1]
  numerator = jnp.zeros_like(image)
  denominator = jnp.zeros_like(image[..., :1])
  for dy in range(-r, r + 1):
    for dx in range(-r, r + 1):
      if dy * dy + dx * dx > r * r:
        continue
      neighbour = padded[..., r + dy:r + dy + height, r + dx:r + dx + width, :]
      diff = jnp.abs(neighbour - image)
      # Channel sum as explicit adds (a reduction over a 3-wide minor axis is slow on CPU).
      distance = functools.reduce(jnp.add, [diff[..., c:c + 1] for c in range(channels)])
      # One exp per tap: exp(space + colour) instead of exp(space) * exp(colour).
      weight = jnp.exp(distance * distance * color_coeff + (dy * dy + dx * dx) * space_coeff)
      numerator = numerator + weight * neighbour
      denominator = denominator + weight
  return numerator / denominator


def _sobel_1d(size, order):
  """OpenCV's getSobelKernels 1-D factor: binomial smoothing convolved `order` times with [-1, 1]."""
  weights = np.array([1.0])
  for _ in range(size - order - 1):
    weights = np.convolve(weights, [1.0, 1.0])
  for _ in range(order):
    weights = np.convolve(weights, [-1.0, 1.0])
  return weights


def sobel(image, *, kernel_size=3, border="reflect"):
  """Sobel derivatives ``(dx, dy)`` as OpenCV ``cv2.Sobel(image, CV_32F, 1, 0 / 0, 1, ksize)``.

  dx grows to the right (along W), dy downwards (along H); unscaled (the 3x3 dx kernel is
  [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]). ``kernel_size`` is 1 (no smoothing), 3, 5 or 7.
  Border: "reflect" by default (OpenCV BORDER_DEFAULT); see the module docstring.
  """
  image = _checks.check_image(image, op="sobel")
  size = _checks.check_kernel_size(kernel_size, op="sobel")
  if size > 7:
    raise ValueError(f"sobel: expected kernel_size in (1, 3, 5, 7); got {size}.")
  mode = _checks.check_border(border, op="sobel")
  deriv = _sobel_1d(max(size, 3), 1)
  smooth = _sobel_1d(size, 0)
  dx = _correlate_separable(image, smooth, deriv, mode)
  dy = _correlate_separable(image, deriv, smooth, mode)
  return dx, dy


def laplacian(image, *, kernel_size=1, border="reflect"):
  """Laplacian ``d2/dx2 + d2/dy2`` as OpenCV ``cv2.Laplacian(image, CV_32F, ksize=kernel_size)``.

  ``kernel_size=1`` uses [[0, 1, 0], [1, -4, 1], [0, 1, 0]]; 3, 5 and 7 sum second-order Sobel
  derivatives of that size (3 gives [[2, 0, 2], [0, -8, 0], [2, 0, 2]]). Border: "reflect" by
  default (OpenCV BORDER_DEFAULT); see the module docstring.
  """
  image = _checks.check_image(image, op="laplacian")
  size = _checks.check_kernel_size(kernel_size, op="laplacian")
  if size > 7:
    raise ValueError(f"laplacian: expected kernel_size in (1, 3, 5, 7); got {size}.")
  mode = _checks.check_border(border, op="laplacian")
  if size == 1:
    kernel = np.array([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    return _correlate2d(image, kernel, mode)
  second, smooth = _sobel_1d(size, 2), _sobel_1d(size, 0)
  return (_correlate_separable(image, smooth, second, mode)
          + _correlate_separable(image, second, smooth, mode))


def unsharp_mask(image, *, sigma=1.0, amount=1.0, kernel_size=None, border="reflect"):
  """Sharpens: ``clip(image + amount * (image - gaussian_blur(image, sigma)), 0, 1)``.

  The same formula as scikit-image ``filters.unsharp_mask(radius=sigma, amount)``, which
  uses a +-4 sigma kernel and border "symmetric". Here ``kernel_size`` defaults as in
  `gaussian_blur` and ``border`` to "reflect"; see the module docstring.
  """
  image = _checks.check_image(image, op="unsharp_mask")
  blurred = gaussian_blur(image, sigma=sigma, kernel_size=kernel_size, border=border)
  return jnp.clip(image + amount * (image - blurred), 0.0, 1.0)
