"""Image file decoding to uint8 RGB arrays (PIL), with corrupt files reported by name.

:func:`decode_image` decodes one file; :func:`decode_all` every example of a source, in
threads, with the memory held by images being decoded at once bounded.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["CorruptImageError", "IMAGE_EXTENSIONS", "MAX_PIXELS", "decode_all", "decode_image", "image_size",
           "require_files"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Images with more pixels than this are refused before decoding (decompression bombs): 64 M
# pixels (192 MB as RGB) passes any camera photo. ``max_pixels=`` (or image-folder
# ``source_options={"max_pixels": N}``) changes it per call.
MAX_PIXELS = 64_000_000
# decode_all: at most this many bytes of images being decoded at once (plus one image).
DECODE_BYTES_IN_FLIGHT = 512 << 20
# PIL's own check warns above ~89 M pixels; MAX_PIXELS (or max_pixels=) decides here instead.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class CorruptImageError(ValueError):
  """An image file could not be decoded (truncated, corrupt or not an image)."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"cannot decode image file {path!r}: {reason}")
    self.path = path
    self.reason = reason


def require_files(files) -> None:
  """Raises FileNotFoundError naming the paths in ``files`` that are not files."""
  missing = [str(f) for f in files if not os.path.isfile(f)]
  if missing:
    raise FileNotFoundError(f"image file(s) not found: {', '.join(missing[:5])}"
                            + (f" ... ({len(missing)} in all)" if len(missing) > 5 else ""))


def _to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, ...) to RGB; alpha is dropped like tf.io.decode_image."""
  if img.mode == "RGB":
    return img
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    arr = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
    arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, mode="L")
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  return img.convert("RGB")


def image_size(path) -> tuple[int, int] | None:
  """(width, height) from the file header without decoding, or None if unreadable."""
  try:
    with Image.open(path) as img:
      return img.size
  except Exception:  # noqa: BLE001 - decode_image reports the reason
    return None


def decode_image(source: str | os.PathLike | bytes, *, draft_size: int | None = None,
                 max_pixels: int | None = None) -> np.ndarray:
  """Decodes a JPEG/PNG/... file (path or bytes) to a uint8 RGB array [H, W, 3].

  Grayscale, palette, RGBA and CMYK images become RGB; EXIF orientation is applied.
  ``draft_size`` lets the JPEG decoder downscale by a power of two while keeping the
  shorter side >= draft_size (much faster for large photos). Raises
  :class:`CorruptImageError` naming the file when it is truncated or not an image, unreadable
  (permissions, a dangling or looping symbolic link) or larger than ``max_pixels`` (default
  :data:`MAX_PIXELS`; a decompression bomb).
  """
  name = "<bytes>" if isinstance(source, (bytes, bytearray)) else os.fspath(source)
  limit = MAX_PIXELS if max_pixels is None else max_pixels
  if name != "<bytes>" and os.path.islink(name) and not os.path.exists(name):
    raise CorruptImageError(name, "a dangling or looping symbolic link")
  try:
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    with fp, Image.open(fp) as img:
      w, h = img.size
      if w * h > limit:
        raise CorruptImageError(name, f"{w}x{h} = {w * h} pixels is over the limit of {limit} "
                                      "(a decompression bomb?); raise max_pixels to read it")
      if draft_size is not None and img.format == "JPEG":
        w, h = img.size
        scale = min(w, h) / max(draft_size, 1)
        if scale >= 2:
          img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
      img.load()
      img = ImageOps.exif_transpose(img)
      return np.asarray(_to_rgb(img), dtype=np.uint8)
  except CorruptImageError:
    raise
  except FileNotFoundError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise CorruptImageError(name, f"{type(e).__name__}: {e}") from e


def decode_all(src, *, strict: bool = False, num_threads: int | None = None) -> tuple[list[dict], list[str]]:
  """Every example ``src[i]`` of a source, decoded in threads: (records in order, corrupt paths).

  Corrupt files are skipped (logged, their paths returned) unless ``strict=True``, which
  raises :class:`CorruptImageError`. When ``src`` lists its files (``src.paths``), the images
  being decoded at once hold at most :data:`DECODE_BYTES_IN_FLIGHT` bytes (one image always
  proceeds), read from the file headers.
  """
  paths = getattr(src, "paths", None)
  budget = _ByteBudget(DECODE_BYTES_IN_FLIGHT)

  def load(i):
    size = image_size(paths[i]) if paths is not None else None
    cost = size[0] * size[1] * 4 if size else 0
    try:
      with budget.hold(cost):
        return src[i]
    except CorruptImageError as e:
      if strict:
        raise
      log.warning("skipping %s", e)
      return e

  workers = num_threads or min(8, (os.cpu_count() or 1) * 2)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    records = list(pool.map(load, range(len(src)), chunksize=64))
  skipped = [r.path for r in records if isinstance(r, CorruptImageError)]
  good = [r for r in records if not isinstance(r, CorruptImageError)]
  return good, skipped


class _ByteBudget:
  """Bounds the bytes of images being decoded at once (one image may always proceed)."""

  def __init__(self, limit: int):
    self.limit, self.used = limit, 0
    self.cond = threading.Condition()

  @contextlib.contextmanager
  def hold(self, cost: int):
    with self.cond:
      self.cond.wait_for(lambda: self.used == 0 or self.used + cost <= self.limit)
      self.used += cost
    try:
      yield
    finally:
      with self.cond:
        self.used -= cost
        self.cond.notify_all()
