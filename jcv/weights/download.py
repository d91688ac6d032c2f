"""Known pretrained weight files: URLs, a local cache, progress bar and sha256 checks.

Names follow Keras applications: ``mobilenet_v2_<width>_<size>`` (with the ImageNet
classifier) or ``..._no_top`` (backbone only), e.g. ``mobilenet_v2_1.0_224_no_top``;
``mobilenet_v1_<width>_<size>[_no_top]`` likewise. Files land in :func:`cache_dir`
(``$JCV_CACHE`` or ``~/.cache/jcv/weights``).

Keras publishes no checksums for these files, so a file's sha256 is pinned on first download
(written next to it as ``<file>.sha256``) and checked on every later use; pass ``sha256=``
to check against a value you trust instead.
"""
from __future__ import annotations

import hashlib
import os
import pathlib
import urllib.error
import urllib.request

__all__ = ["DownloadError", "cache_dir", "fetch", "known_weights", "weight_url"]

_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/"
_V2_WIDTHS = ("0.35", "0.5", "0.75", "1.0", "1.3", "1.4")
_V2_SIZES = (96, 128, 160, 192, 224)
_V1_WIDTHS = {"0.25": "2_5", "0.5": "5_0", "0.75": "7_5", "1.0": "1_0"}
_V1_SIZES = (128, 160, 192, 224)
_LOCAL_HINT = ("pass a local file instead, e.g. jcv.weights.pretrained('mobilenet_v2', "
               "'../shared/weights/mobilenet_v2_1.0_224_backbone.npz')")


class DownloadError(RuntimeError):
  """A known weight file could not be fetched or failed its checksum."""


def _table() -> dict[str, str]:
  urls = {}
  for w in _V2_WIDTHS:
    for s in _V2_SIZES:
      base = f"{_KERAS}mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{w}_{s}"
      urls[f"mobilenet_v2_{w}_{s}"] = base + ".h5"
      urls[f"mobilenet_v2_{w}_{s}_no_top"] = base + "_no_top.h5"
  for w, tag in _V1_WIDTHS.items():
    for s in _V1_SIZES:
      base = f"{_KERAS}mobilenet/mobilenet_{tag}_{s}_tf"
      urls[f"mobilenet_v1_{w}_{s}"] = base + ".h5"
      urls[f"mobilenet_v1_{w}_{s}_no_top"] = base + "_no_top.h5"
  return urls


_URLS = _table()


def known_weights() -> list[str]:
  """Names accepted by :func:`fetch` (and as ``source`` by ``jcv.weights.pretrained``)."""
  return sorted(_URLS)


def weight_url(name: str) -> str:
  """The download URL of a known weight file."""
  if name not in _URLS:
    raise ValueError(f"unknown weight name {name!r}; expected a local file path or one of "
                     f"mobilenet_v2_<width>_<size>[_no_top] (widths {', '.join(_V2_WIDTHS)}; sizes "
                     f"{', '.join(map(str, _V2_SIZES))}) or mobilenet_v1_<width>_<size>[_no_top]")
  return _URLS[name]


def cache_dir() -> pathlib.Path:
  """Where downloads are kept: ``$JCV_CACHE`` or ``~/.cache/jcv/weights``."""
  return pathlib.Path(os.environ.get("JCV_CACHE", pathlib.Path.home() / ".cache" / "jcv" / "weights"))


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def fetch(name: str, *, url: str | None = None, sha256: str | None = None,
          directory=None, progress: bool = True, timeout: float = 30.0) -> pathlib.Path:
  """Returns the local path of a known weight file, downloading it once into the cache.

  ``url`` overrides the known URL (mirrors, tests); ``sha256`` pins the expected checksum.
  """
  url = url or weight_url(name)
  directory = pathlib.Path(directory) if directory is not None else cache_dir()
  directory.mkdir(parents=True, exist_ok=True)
  target = directory / url.rsplit("/", 1)[-1]
  pin = target.with_name(target.name + ".sha256")
  if not target.is_file():
    _download(url, target, progress=progress, timeout=timeout)
  actual = _sha256(target)
  expected = sha256 or (pin.read_text().strip() if pin.is_file() else None)
  if expected is not None and actual != expected:
    raise DownloadError(f"sha256 of {target} is {actual}, expected {expected}; delete the file "
                        "to download it again")
  if not pin.is_file():
    pin.write_text(actual + "\n")
  return target


def _download(url: str, target: pathlib.Path, *, progress: bool, timeout: float):
  from tqdm import tqdm
  partial = target.with_name(target.name + ".part")
  try:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
      total = int(response.headers.get("Content-Length") or 0) or None
      with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress) as bar:
        for chunk in iter(lambda: response.read(1 << 16), b""):
          out.write(chunk)
          bar.update(len(chunk))
  except (urllib.error.URLError, OSError) as e:
    partial.unlink(missing_ok=True)
    reason = getattr(e, "reason", e)
    raise DownloadError(f"could not download {url} ({reason}), so you are probably offline: "
                        f"{_LOCAL_HINT}") from e
  partial.replace(target)
