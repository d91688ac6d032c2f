"""Random-access data sources: image folders, tfds datasets and in-memory arrays.

Every source has ``len(src)``, ``src[i] -> {"image": uint8 [H, W, 3], "label": int}`` and
``src.class_names``, so nothing downstream knows where the data came from.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from jcv import cachefile
from jcv.data import decode as decode_lib
from jcv.data import folders
from jcv.data.decode import CorruptImageError, decode_image

__all__ = [
  "ArraySource", "CorruptImageError", "DataUnavailableError", "ImageFolderSource", "TfdsSource", "default_cache_dir",
  "image_folder", "resolve", "tfds_source", "to_memory",
]

log = logging.getLogger(__name__)

# Images at most this many pixels are decoded once into memory by ``cache="auto"``.
AUTO_CACHE_MAX_PIXELS = 64 * 64
# Part of every .npy cache key: bump when decoding changes what a file decodes to.
CACHE_VERSION = 2


class DataUnavailableError(RuntimeError):
  """A dataset (tfds) is not where the run looks for it; the message says where and what to do."""


def default_cache_dir() -> pathlib.Path:
  """``$JCV_CACHE_DIR`` if set, else ``~/.cache/jcv/data``."""
  env = os.environ.get("JCV_CACHE_DIR")
  return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "jcv" / "data"


# --------------------------------------------------------------------------- arrays


class ArraySource:
  """In-memory images (uint8 [N, H, W, 3] array, or a list of [H, W, 3] arrays) and int labels."""

  def __init__(self, images, labels, *, class_names: Sequence[str] | None = None, skipped: Sequence[str] = ()):
    if isinstance(images, np.ndarray):
      if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be a uint8 array [N, H, W, 3] (or [N, H, W, 1]); got {images.dtype} {images.shape}")
    elif not all(isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 3 for im in images):
      raise ValueError("images must be a uint8 array [N, H, W, 3] or a list of uint8 [H, W, 3] arrays")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be a 1-D integer array; got {labels.dtype} {labels.shape}")
    if len(labels) != len(images):
      raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}")
    if class_names is None:
      class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_names)):
      raise ValueError(f"labels must lie in [0, {len(class_names)}) for {len(class_names)} class names")
    self.images = images
    self.labels = labels.astype(np.int32)
    self.class_names = list(class_names)
    self.skipped = list(skipped)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> dict[str, Any]:
    image = self.images[i]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    return {"image": image, "label": int(self.labels[i])}

  @property
  def uniform_shape(self) -> tuple[int, ...] | None:
    """[H, W, C] when all images share it (one array), else None."""
    return tuple(self.images.shape[1:]) if isinstance(self.images, np.ndarray) else None

  def __repr__(self):
    return f"ArraySource({len(self)} images, {len(self.class_names)} classes)"


# --------------------------------------------------------------------------- image folders

class ImageFolderSource:
  """Image files listed once; ``src[i]`` decodes file i (raises CorruptImageError naming it)."""

  def __init__(self, paths: Sequence[str], labels: Sequence[int], class_names: Sequence[str], *, root: str = "",
               max_pixels: int | None = None):
    self.paths = list(paths)
    self.labels = np.asarray(labels, np.int32)
    self.class_names = list(class_names)
    self.root = root
    self.max_pixels = max_pixels  # None: jcv.data.decode.MAX_PIXELS
    self.skipped: list[str] = []

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> dict[str, Any]:
    return {"image": decode_image(self.paths[i], max_pixels=self.max_pixels), "label": int(self.labels[i])}

  def load(self, i: int, *, draft_size: int | None = None) -> dict[str, Any]:
    """Like ``src[i]`` but lets JPEG decoding downscale towards ``draft_size`` (shorter side)."""
    return {"image": decode_image(self.paths[i], draft_size=draft_size, max_pixels=self.max_pixels),
            "label": int(self.labels[i])}

  def __repr__(self):
    return f"ImageFolderSource({self.root!r}, {len(self)} files, {len(self.class_names)} classes)"


def image_folder(
  root: str | os.PathLike,
  *,
  split: str | None = None,
  val_fraction: float | None = None,
  seed: int = 0,
  cache: bool | str = "auto",
  cache_dir: str | os.PathLike | None = None,
  strict: bool = False,
  max_pixels: int | None = None,
) -> ImageFolderSource | ArraySource:
  """An image-folder source: ``root/<split>/<class>/<file>`` or ``root/<class>/<file>``.

  Classes are the sub-folder names sorted; they come from ``root/train`` when it exists so
  train and test labels agree. ``split`` may carry a slice (``"train[:90%]"``,
  ``"test[100:]"``). ``val_fraction`` carves a stratified, seeded validation set out of the
  training files: ``split="train"`` is then the rest and ``split="val"`` the carved part
  (a real ``root/val`` folder is used as is when it exists). In the flat layout,
  ``split=None`` means all files.

  ``cache``: ``True`` decodes every file once into a uint8 array (returns an
  :class:`ArraySource`), saved under ``cache_dir`` (default :func:`default_cache_dir`) as
  .npy so the next run loads in seconds; ``"auto"`` does so when the first image is at most
  64x64 pixels (CIFAR-sized); ``False`` decodes on every access. While caching, corrupt
  files are skipped and listed in ``src.skipped`` unless ``strict=True``, which raises
  :class:`CorruptImageError` naming the file. Unreadable files (permissions, dangling or
  looping symbolic links) and images over ``max_pixels`` (default
  :data:`jcv.data.decode.MAX_PIXELS`) count as corrupt. Empty class folders are refused.
  """
  root_path = pathlib.Path(root).expanduser()
  if not root_path.is_dir():
    raise ValueError(f"image folder {str(root_path)!r} does not exist or is not a directory")
  paths, labels, class_names = folders.list_split(root_path, split, val_fraction=val_fraction, seed=seed)
  src = ImageFolderSource(paths, labels, class_names, root=str(root_path), max_pixels=max_pixels)

  if cache == "auto":
    sizes = [decode_lib.image_size(p) for p in (paths[0], paths[-1])]  # headers only
    first = next((wh for wh in sizes if wh is not None), None)
    if first is None or first[0] * first[1] > AUTO_CACHE_MAX_PIXELS:
      return src
    try:
      return to_memory(src, cache_dir=cache_dir, strict=strict)
    except _MixedShapes as e:
      log.info("not caching %s in memory: %s", src, e)
      return src
  if cache not in (True, False):
    raise ValueError(f"cache must be True, False or 'auto'; got {cache!r}")
  return to_memory(src, cache_dir=cache_dir, strict=strict) if cache else src


class _MixedShapes(ValueError):
  pass


def _fingerprint(src: ImageFolderSource) -> str:
  """Key of a .npy cache: file list, labels, sizes, times, classes, pixel limit, decoder version."""
  h = hashlib.sha1()
  h.update(json.dumps([src.class_names, CACHE_VERSION, getattr(src, "max_pixels", None)]).encode())
  for p, label in zip(src.paths, src.labels):
    try:
      st = os.stat(p)
      stamp = f"{st.st_size}\0{st.st_mtime_ns}"
    except OSError as e:  # dangling/looping link, no permission: decoding reports it
      stamp = f"unreadable {e.errno}"
    h.update(f"{p}\0{label}\0{stamp}\n".encode())
  return h.hexdigest()[:20]


def to_memory(
  src, *, cache_dir: str | os.PathLike | None = None, strict: bool = False, num_threads: int | None = None,
) -> ArraySource:
  """Decodes every example of ``src`` once into an :class:`ArraySource` (uint8 arrays).

  For an image folder the arrays are saved to ``cache_dir`` (default
  :func:`default_cache_dir`; pass ``False`` for none), keyed by the file list, sizes and
  modification times, and loaded from there next time. All images must share one shape.
  Corrupt files are skipped and listed in ``.skipped`` (``strict=True`` raises instead).
  """
  if isinstance(src, ArraySource):
    return src
  paths = getattr(src, "paths", None)
  stem = None
  if paths is not None and cache_dir is not False:
    cdir = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stem = cdir / f"{pathlib.Path(getattr(src, 'root', 'data')).name or 'data'}-{_fingerprint(src)}"
    cached = cachefile.load(lambda: _read_cache(stem), _cache_files(stem), what="decoded-image")
    if cached is not None:
      if cached.skipped and strict:
        raise CorruptImageError(cached.skipped[0], "recorded as corrupt in the cache")
      return cached

  good, skipped = decode_lib.decode_all(src, strict=strict, num_threads=num_threads)
  if not good:
    raise ValueError(f"no decodable images in {src!r}")
  shapes = {r["image"].shape for r in good}
  if len(shapes) > 1:
    raise _MixedShapes(f"images differ in shape ({sorted(shapes)[:3]} ...); resize them or use cache=False")
  images = np.stack([r["image"] for r in good])
  labels = np.asarray([r["label"] for r in good], np.int32)
  if skipped:
    log.warning("skipped %d corrupt image file(s) of %d", len(skipped), len(src))
  if stem is not None:
    meta = {"class_names": src.class_names, "skipped": skipped, "root": getattr(src, "root", ""), "count": len(good)}
    cachefile.save(lambda tmp: (np.save(tmp[0], images), np.save(tmp[1], labels),
                                tmp[2].write_text(json.dumps(meta))),
                   _cache_files(stem), what="decoded-image")  # the .json last: marks it complete
  return ArraySource(images, labels, class_names=src.class_names, skipped=skipped)


def _cache_files(stem: pathlib.Path) -> list[pathlib.Path]:
  return [pathlib.Path(f"{stem}.images.npy"), pathlib.Path(f"{stem}.labels.npy"), stem.with_suffix(".json")]


def _read_cache(stem: pathlib.Path) -> ArraySource:
  """The cached arrays, checked against their .json record (a mismatch is a ValueError)."""
  images_path, labels_path, meta_path = _cache_files(stem)
  meta = json.loads(meta_path.read_text())
  images, labels = np.load(images_path, allow_pickle=False), np.load(labels_path, allow_pickle=False)
  if not (isinstance(meta, dict) and len(images) == len(labels) == meta["count"]):
    raise ValueError(f"{len(images)} images, {len(labels)} labels for a record of {meta!r:.80}")
  return ArraySource(images, labels, class_names=meta["class_names"], skipped=meta["skipped"])


# --------------------------------------------------------------------------- tfds


class TfdsSource:
  """A ``tfds.data_source`` wrapped to yield ``{"image": uint8 HWC RGB, "label": int}``."""

  def __init__(self, data_source, class_names: Sequence[str], *, image_key: str = "image", label_key: str = "label"):
    self.data_source = data_source
    self.class_names = list(class_names)
    self.image_key = image_key
    self.label_key = label_key

  @property
  def image_shape(self) -> tuple | None:
    """The image feature's declared shape (None entries for variable sizes), if known."""
    try:
      return tuple(self.data_source.dataset_info.features[self.image_key].shape)
    except Exception:  # noqa: BLE001 - info layouts differ between tfds versions and mocks
      return None

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, i: int) -> dict[str, Any]:
    ex = self.data_source[int(i)]
    image = np.asarray(ex[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    elif image.shape[-1] == 4:
      image = image[..., :3]
    return {"image": image.astype(np.uint8, copy=False), "label": int(ex[self.label_key])}

  def __repr__(self):
    return f"TfdsSource({len(self)} examples, {len(self.class_names)} classes)"


def tfds_source(
  name: str, *, split: str, data_dir: str | os.PathLike | None = None, download: bool = False,
  image_key: str = "image", label_key: str = "label",
) -> TfdsSource:
  """A tfds dataset by name (``"cifar10"``, ``"cats_vs_dogs"``, ``"food101"``) through
  ``tfds.data_source`` (random access, array_record). ``split`` takes tfds slicing
  (``"train[:90%]"``). With ``download=True`` a missing dataset is downloaded and prepared
  into ``data_dir``; otherwise (and offline) a clear error names the ways out.
  """
  import tensorflow_datasets as tfds  # slow import; only when used

  try:
    ds = tfds.data_source(name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
                          download=download)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown tfds dataset {name!r} (and no such image folder)") from e
  except Exception as e:  # missing files, no network, wrong file format
    where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
    how = "could not be downloaded and prepared" if download else "is not prepared there and download=False"
    raise DataUnavailableError(
      f"tfds dataset {name!r} split {split!r} is not available in {str(where)!r} ({how}): pass "
      f"data_dir= a directory where it is already prepared in array_record format, or point the "
      f"data spec at an image folder laid out as root/<split>/<class>/<file>. [{type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}]") from e
  class_names = None
  info = getattr(ds, "dataset_info", None)
  feature = None
  try:
    feature = info.features[label_key]
  except Exception:  # noqa: BLE001 - info layouts differ between tfds versions and mocks
    pass
  if feature is not None and getattr(feature, "names", None):
    class_names = list(feature.names)
  if class_names is None:
    class_names = [str(i) for i in range(int(getattr(feature, "num_classes", 0) or 0))]
  return TfdsSource(ds, class_names, image_key=image_key, label_key=label_key)


# --------------------------------------------------------------------------- resolve


def resolve(
  spec, *, split: str, data_dir: str | os.PathLike | None = None, download: bool = False,
  val_fraction: float | None = None, seed: int = 0, **folder_options,
):
  """A source from a spec: an existing source object (returned as is), an image-folder
  path (``root/<split>/<class>/<file>``), or a tfds dataset name (read from ``data_dir``).

  If ``data_dir`` itself is an image folder holding ``spec`` (``data_dir/spec/<split>``),
  that folder is used. ``folder_options`` (cache, cache_dir, strict) go to
  :func:`image_folder`; a tfds dataset with fixed small images (CIFAR) is decoded once into
  memory too with ``cache="auto"`` (no disk cache: tfds already stores it compactly).
  """
  if hasattr(spec, "__getitem__") and hasattr(spec, "class_names"):
    return spec
  spec_str = os.fspath(spec)
  if data_dir is not None and not pathlib.Path(data_dir).expanduser().is_dir():
    raise ValueError(f"data directory {os.fspath(data_dir)!r} does not exist (--data-dir): pass an image "
                     "folder root/<split>/<class>/<file> or a tfds data_dir")
  candidates = [pathlib.Path(spec_str).expanduser()]
  if data_dir is not None:
    candidates.append(pathlib.Path(data_dir).expanduser() / spec_str)
  for cand in candidates:  # a prepared tfds dataset (<name>/<version>/dataset_info.json) is not a folder
    if cand.is_dir() and not any(cand.glob("*/dataset_info.json")):
      return image_folder(cand, split=split, val_fraction=val_fraction, seed=seed, **folder_options)
  if os.sep in spec_str or spec_str.startswith("."):
    raise ValueError(f"image folder {spec_str!r} does not exist")
  if data_dir is not None and folders.looks_like_image_folder(pathlib.Path(data_dir).expanduser()):
    found = folders.list_classes(pathlib.Path(data_dir).expanduser())
    raise ValueError(f"split {split.split('[', 1)[0]!r} not found in the image folder {os.fspath(data_dir)!r} "
                     f"(sub-folders: {found}): add {os.fspath(data_dir)}/{split.split('[', 1)[0]}/<class>/<file>, "
                     "or choose another split (e.g. --set eval_split=... or val_fraction=0.1)")
  if val_fraction:
    raise ValueError("val_fraction applies to image folders; for tfds use split slicing like 'train[:90%]'")
  src = tfds_source(spec_str, split=split, data_dir=data_dir, download=download)
  cache = folder_options.get("cache", "auto")
  shape = src.image_shape
  small = shape is not None and None not in shape and shape[0] * shape[1] <= AUTO_CACHE_MAX_PIXELS
  if cache is True or (cache == "auto" and small):
    return to_memory(src, cache_dir=False, strict=folder_options.get("strict", False))
  return src
