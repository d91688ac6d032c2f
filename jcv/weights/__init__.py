"""jcv.weights: pretrained weights ported into jcv models.

``model, variables = jcv.weights.pretrained("mobilenet_v2", source, num_classes=0)`` where
``source`` is a local file (the TF-slim ``.npz`` in ../shared/weights, a Keras applications
``.h5``, a PyTorch EfficientNet-Lite state dict as ``.npz`` or ``.pth``) or a known download
name such as ``"mobilenet_v2_1.0_224_no_top"``. ``pretrained_info(name)`` gives what the
weights expect: input size, mean/std (in ``Config``'s convention) and eval crop.
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jcv.weights import download, port
from jcv.weights.download import DownloadError, fetch, known_weights
from jcv.weights.port import NAME_MAPS, PortError, PortTable, load_head, port_variables, read_arrays

__all__ = [
    "DownloadError", "NAME_MAPS", "PortError", "PortTable", "PretrainedInfo", "classifier_classes",
    "download", "fetch", "imagenet_labels", "known_weights", "load_head", "port",
    "port_variables", "pretrained", "pretrained_info", "read_arrays",
]


@dataclasses.dataclass(frozen=True)
class PretrainedInfo:
  """What a pretrained backbone expects of its inputs.

  ``mean``/``std`` are in ``jcv.train.Config``'s convention: applied to pixels scaled to
  [0, 1] (``(x / 255 - mean) / std``); ``input_size`` is the size the weights were trained at
  (the model card's); ``crop_fraction`` the centre crop of the evaluation view
  (``eval_resize_crop``); ``preprocessing`` the same normalisation on uint8 pixels, in words.
  """
  name: str
  input_size: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  crop_fraction: float = 0.875
  preprocessing: str = ""

  def config_fields(self) -> dict:
    """``jcv.train.Config`` section fields for this backbone: ``config.replace(**info.config_fields())``."""
    return {"model": {"name": self.name}, "data": {"image_size": self.input_size, "mean": self.mean, "std": self.std},
            "evaluation": {"crop_fraction": self.crop_fraction}}

  def normalize(self, images) -> np.ndarray:
    """uint8 NHWC images -> float32 model inputs, as the weights were trained."""
    x = np.asarray(images, np.float32) / 255.0
    return (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)


@dataclasses.dataclass(frozen=True)
class _Preprocessing:
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  description: str
  crop_margin: int | None = None  # eval crop size / (size + margin); None: 0.875

  def info(self, name: str, input_size: int) -> PretrainedInfo:
    crop = 0.875 if self.crop_margin is None else input_size / (input_size + self.crop_margin)
    return PretrainedInfo(name, input_size, self.mean, self.std, crop_fraction=crop,
                          preprocessing=self.description)


_MINUS1_1 = _Preprocessing((0.5,) * 3, (0.5,) * 3, "x / 127.5 - 1")
_LITE = _Preprocessing((127 / 255,) * 3, (128 / 255,) * 3, "(x - 127) / 128", crop_margin=32)  # TF's eval crop
# Each weight set's preprocessing, declared once; its input size is its model card's.
_PREPROCESSING = {
    "mobilenet_v1": _MINUS1_1,
    "mobilenet_v2": _MINUS1_1,
    **{f"efficientnet_lite{i}": _LITE for i in range(5)},
}


def pretrained_info(name: str) -> PretrainedInfo:
  """The :class:`PretrainedInfo` (input size, mean/std, crop) of a model with ported weights."""
  if name not in _PREPROCESSING:
    raise ValueError(f"no pretrained weights known for {name!r}; known: {', '.join(sorted(_PREPROCESSING))}")
  from jcv.models import get_card
  return _PREPROCESSING[name].info(name, get_card(name).input_size)


def _resolve_source(name: str, source) -> tuple[pathlib.Path, dict]:
  """A local path, or a known download name -> (path, model options implied by the name)."""
  path = pathlib.Path(source)
  if path.is_file():
    return path, {}
  if str(source) in download.known_weights():
    parts = str(source).split("_")
    if "_".join(parts[:2]) != name:
      raise ValueError(f"weights {source!r} are for {'_'.join(parts[:2])}, not {name!r}")
    return download.fetch(str(source)), {"width": float(parts[2])}
  raise ValueError(f"weights source {str(source)!r} is neither an existing file nor a known "
                   f"download name (see jcv.weights.known_weights())")


def _format(name: str, path: pathlib.Path) -> str:
  """The file format a port of ``name`` reads from ``path``'s suffix (ValueError if none)."""
  suffix = path.suffix.lower()
  formats = sorted(f for m, f in NAME_MAPS if m == name and suffix in port.FORMATS.get(f, ()))
  if len(formats) != 1:
    known = ", ".join(f"{m} ({f}: {'/'.join(port.FORMATS.get(f, ()))})" for m, f in sorted(NAME_MAPS))
    problem = "no port" if not formats else f"several ports ({formats})"
    raise ValueError(f"{problem} of {suffix or 'suffix-less'} files for {name!r}; ports exist for: {known}")
  return formats[0]


def _is_head_fn(name_map):
  return getattr(name_map, "is_head", lambda n: False)


def _head_classes(arrays, name_map) -> int | None:
  bias = name_map(("params", "head", "bias"))[0]
  return int(arrays[bias].shape[-1]) if bias in arrays else None


def classifier_classes(name: str, source) -> int | None:
  """Class count of the classifier stored in a weight file (None if it has none)."""
  path, _ = _resolve_source(name, source)
  return _head_classes(read_arrays(path), NAME_MAPS[(name, _format(name, path))])


def pretrained(name: str, source, *, num_classes: int = 0, head=None, seed: int = 0,
               **model_options):
  """Builds ``jcv.models.create(name, ...)`` and loads pretrained weights into it, strictly.

  Args:
    name: model name, e.g. ``"mobilenet_v2"``.
    source: local ``.npz`` (TF-slim arrays, or a PyTorch state dict saved with ``numpy.savez``)
      / Keras ``.h5`` / PyTorch ``.pth`` file, or a known download name.
    num_classes: 0 for the pooled-feature extractor; the file's (or ``head``'s) class count to
      keep the pretrained classifier; any other number attaches a freshly initialised head.
    head: optional classifier file (see :func:`jcv.weights.port.load_head`), e.g.
      ``mobilenet_v2_1.0_224_head_1001.npz`` with ``num_classes=1001``.
    seed: seeds the initialisation of a fresh head.
    **model_options: passed to ``jcv.models.create`` (``width``, ``dropout_rate``, ...).

  Returns:
    ``(model, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``.
  """
  import jcv.models

  path, implied = _resolve_source(name, source)
  fmt = _format(name, path)
  name_map = NAME_MAPS[(name, fmt)]
  is_head = _is_head_fn(name_map)
  options = {**implied, **model_options}
  arrays = read_arrays(path)
  head_arrays = None
  if head is not None:
    head_arrays = load_head(head)
    classes = head_arrays["kernel"].shape[-1]
    if num_classes != classes:
      raise ValueError(f"head file {head} has {classes} classes; pass num_classes={classes}")
    arrays = {k: v for k, v in arrays.items() if not is_head(k)}
  model = jcv.models.create(name, num_classes=num_classes, **options)
  key = jax.random.key(seed)
  file_has_head = any(is_head(k) for k in arrays)
  file_head_fits = file_has_head and num_classes > 0 and _head_classes(arrays, name_map) == num_classes
  keep_head = num_classes > 0 and head_arrays is None and not file_head_fits
  init = functools.partial(model.init, {"params": key, "dropout": key},
                           jnp.zeros((1, 32, 32, 3), jnp.float32))
  template = jax.eval_shape(init)  # shapes only: compiling the whole init is slow on CPU
  if keep_head:
    template = _with_fresh_head(template, key)
  if head_arrays is not None:
    name_map = _with_head_file(name_map)
    arrays = {**arrays, **{f"__head__/{k}": v for k, v in head_arrays.items()}}
  variables = port_variables(
      template, arrays, name_map, source=str(path),
      keep=(lambda p: p[1] == "head") if keep_head else None,
      ignore=is_head if not file_head_fits else None)
  return model, jax.tree.map(jnp.asarray, variables)


def _with_fresh_head(template, key):
  """Initialises the ``head`` Dense of a jcv model (lecun-normal kernel, zero bias)."""
  import flax.linen as nn
  kernel = template["params"]["head"]["kernel"]
  dense = nn.Dense(kernel.shape[-1], dtype=kernel.dtype)
  head = dense.init(key, jnp.zeros((1, kernel.shape[0]), kernel.dtype))["params"]
  return {**template, "params": {**template["params"], "head": head}}


def _with_head_file(table):
  """``table`` with the ``head`` taken from a separate head file (arrays ``__head__/...``)."""
  rules = (port.Rule("head/(kernel|bias)", "__head__/{0}"),) + tuple(getattr(table, "rules", ()))
  if not isinstance(table, PortTable):  # a plain name-map function
    return lambda p: (f"__head__/{p[-1]}", "same") if p[1] == "head" else table(p)
  return PortTable(table.description, rules, head=table.head, ignore=table.ignore)


def imagenet_labels(path) -> list[str]:
  """Reads a label file with one class name per line (e.g. ``imagenet_labels_1001.txt``)."""
  return [line.strip() for line in pathlib.Path(path).read_text().splitlines() if line.strip()]

