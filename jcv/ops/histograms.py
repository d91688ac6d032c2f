"""Histograms and histogram equalisation (global and CLAHE) on float images [..., H, W, C].

Equalisation works on 256 grey levels per channel, exactly as OpenCV does on uint8
images: values are quantised with ``round(255 x)``, mapped through a look-up table and
returned as float ``level / 255``. Channels are processed independently; for colour
images, equalising only the luma (e.g. the Y of `rgb_to_ycbcr` or the L of `rgb_to_lab`)
keeps hues intact. These are not differentiable (quantisation).
"""
import jax.numpy as jnp
import numpy as np

from jcv.ops import _checks

__all__ = ["histogram", "equalize_histogram", "clahe"]

_LEVELS = 256


def _quantize(image):
  return jnp.clip(jnp.round(image * (_LEVELS - 1)), 0, _LEVELS - 1).astype(jnp.int32)


def _channels_first(image):
  """[..., H, W, C] -> ([B, H, W] with B = prod(...) * C, restore function)."""
  lead, (height, width, channels) = image.shape[:-3], image.shape[-3:]
  flat = jnp.moveaxis(image.reshape((-1, height, width, channels)), -1, 1)

  def restore(x):
    x = jnp.moveaxis(x.reshape((-1, channels, height, width)), 1, -1)
    return x.reshape(lead + (height, width, channels))

  return flat.reshape((-1, height, width)), restore


def _bincount_rows(indices, num_bins):
  """Counts per row: indices [R, M] in [0, num_bins) -> counts [R, num_bins] (one scatter)."""
  rows = indices.shape[0]
  flat = (indices + num_bins * jnp.arange(rows, dtype=indices.dtype)[:, None]).reshape(-1)
  return jnp.bincount(flat, length=rows * num_bins).reshape((rows, num_bins))


def histogram(image, *, num_bins=256):
  """Per-channel histogram: counts [..., C, num_bins] of values in [0, 1].

  Bins are uniform over [0, 1] and the last one includes 1.0 (as ``np.histogram(x, bins,
  range=(0, 1))``); values outside [0, 1] are counted in the first or last bin.
  """
  image = _checks.check_image(image, op="histogram")
  if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"histogram: expected num_bins to be an int >= 1; got {num_bins!r}.")
  lead, channels = image.shape[:-3], image.shape[-1]
  flat, _ = _channels_first(image)
  bins = jnp.clip(jnp.floor(flat * num_bins), 0, num_bins - 1).astype(jnp.int32)
  counts = _bincount_rows(bins.reshape((bins.shape[0], -1)), num_bins)
  return counts.reshape(lead + (channels, num_bins))


def equalize_histogram(image):
  """Global histogram equalisation per channel, as OpenCV ``cv2.equalizeHist`` (uint8 maths).

  The look-up table is ``round((cdf - cdf_min) * 255 / (pixels - cdf_min))`` with ``cdf_min``
  the count of the darkest present level; a constant channel is returned unchanged.
  Values are quantised to 256 levels (see the module docstring).
  """
  image = _checks.check_image(image, op="equalize_histogram")
  flat, restore = _channels_first(image)
  levels = _quantize(flat)
  rows = levels.reshape((levels.shape[0], -1))
  counts = _bincount_rows(rows, _LEVELS)
  cdf = jnp.cumsum(counts, axis=-1)
  total = rows.shape[-1]
  first = jnp.argmax(counts > 0, axis=-1)
  cdf_min = jnp.take_along_axis(cdf, first[:, None], axis=-1)
  scale = (_LEVELS - 1.0) / jnp.maximum(total - cdf_min, 1).astype(jnp.float32)
  lut = jnp.clip(jnp.round((cdf - cdf_min).astype(jnp.float32) * scale), 0, _LEVELS - 1)
  constant = cdf_min == total  # one level only: OpenCV returns the input unchanged
  lut = jnp.where(constant, jnp.arange(_LEVELS, dtype=jnp.float32), lut)
  mapped = jnp.take_along_axis(lut, rows, axis=-1).reshape(levels.shape)
  return restore(mapped / (_LEVELS - 1.0)).astype(image.dtype)


def _tile_positions(length, tile, tiles):
  """OpenCV's bilinear tile coordinates: (first tile, second tile, weight of the second)."""
  pos = np.arange(length, dtype=np.float32) * (np.float32(1.0) / np.float32(tile)) - np.float32(0.5)
  first = np.floor(pos).astype(np.int64)
  weight = (pos - first.astype(np.float32)).astype(np.float32)
  return np.maximum(first, 0), np.minimum(first + 1, tiles - 1), weight


def clahe(image, *, clip_limit=2.0, tile_grid=(8, 8)):
  """Contrast-limited adaptive histogram equalisation, as OpenCV ``cv2.createCLAHE``.

  The image is split into ``tile_grid = (rows, cols)`` tiles; each tile's 256-bin histogram is
  clipped at ``max(1, int(clip_limit * tile_pixels / 256))`` and the excess redistributed evenly,
  its CDF becomes a look-up table, and every pixel bilinearly blends the tables of the four
  nearest tile centres (clamped at the image border). When the size is not a multiple of the
  grid, tables are computed on an image extended at the bottom/right with "reflect" borders
  (OpenCV's BORDER_REFLECT_101, by ``tiles - size % tiles`` pixels). ``clip_limit <= 0``
  disables clipping. Values are quantised to 256 levels (see the module docstring).
  """
  image = _checks.check_image(image, op="clahe")
  if (len(tile_grid) != 2 or any(not isinstance(t, (int, np.integer)) or t < 1 for t in tile_grid)):
    raise ValueError(f"clahe: expected tile_grid to be two ints >= 1 (rows, cols); got {tile_grid!r}.")
  tiles_y, tiles_x = int(tile_grid[0]), int(tile_grid[1])
  flat, restore = _channels_first(image)
  levels = _quantize(flat)
  batch, height, width = levels.shape
  ext = levels
  if height % tiles_y or width % tiles_x:
    pad_y, pad_x = tiles_y - height % tiles_y, tiles_x - width % tiles_x
    if pad_y >= height or pad_x >= width:
      raise ValueError(f"clahe: image {height}x{width} is too small for a {tiles_y}x{tiles_x} tile grid.")
    ext = jnp.pad(levels, ((0, 0), (0, pad_y), (0, pad_x)), mode="reflect")
  tile_h, tile_w = ext.shape[1] // tiles_y, ext.shape[2] // tiles_x
  tile_pixels = tile_h * tile_w

  # Histogram of every tile: [B * tiles_y * tiles_x, 256].
  tiled = ext.reshape((batch, tiles_y, tile_h, tiles_x, tile_w)).transpose((0, 1, 3, 2, 4))
  hist = _bincount_rows(tiled.reshape((-1, tile_pixels)), _LEVELS)

  if clip_limit > 0:
    limit = max(int(clip_limit * tile_pixels / _LEVELS), 1)
    clipped = jnp.sum(jnp.maximum(hist - limit, 0), axis=-1, keepdims=True)
    hist = jnp.minimum(hist, limit)
    batch_add = clipped // _LEVELS
    residual = clipped - batch_add * _LEVELS
    step = jnp.maximum(_LEVELS // jnp.maximum(residual, 1), 1)
    bins = jnp.arange(_LEVELS)
    extra = ((bins % step) == 0) & ((bins // step) < residual)
    hist = hist + batch_add + extra.astype(hist.dtype)

  lut_scale = np.float32(_LEVELS - 1) / np.float32(tile_pixels)
  lut = jnp.clip(jnp.round(jnp.cumsum(hist, axis=-1).astype(jnp.float32) * lut_scale), 0, _LEVELS - 1)
  lut = lut.reshape(-1)

  ty1, ty2, ya = _tile_positions(height, tile_h, tiles_y)
  tx1, tx2, xa = _tile_positions(width, tile_w, tiles_x)
  base = (jnp.arange(batch) * tiles_y * tiles_x)[:, None, None]

  def table(ty, tx):
    index = (base + (ty[:, None] * tiles_x + tx[None, :])[None]) * _LEVELS + levels
    return lut[index]

  xa, ya = jnp.asarray(xa)[None, None, :], jnp.asarray(ya)[None, :, None]
  top = table(ty1, tx1) * (1 - xa) + table(ty1, tx2) * xa
  bottom = table(ty2, tx1) * (1 - xa) + table(ty2, tx2) * xa
  result = jnp.clip(jnp.round(top * (1 - ya) + bottom * ya), 0, _LEVELS - 1)
  return restore(result / (_LEVELS - 1.0)).astype(image.dtype)
