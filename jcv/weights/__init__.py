"""jcv.weights: pretrained weights ported into jcv models.

``model, variables = jcv.weights.pretrained("mobilenet_v2", source, num_classes=0)`` where
``source`` is a local file (the TF-slim ``.npz`` in ../shared/weights, or a Keras applications
``.h5``) or a known download name such as ``"mobilenet_v2_1.0_224_no_top"``.
"""
from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp

from jcv.weights import download, port
from jcv.weights.download import DownloadError, fetch, known_weights
from jcv.weights.port import NAME_MAPS, PortError, load_head, port_variables, read_arrays

__all__ = [
    "DownloadError", "NAME_MAPS", "PortError", "download", "fetch", "imagenet_labels",
    "known_weights", "load_head", "port", "port_variables", "pretrained", "read_arrays",
]

_HEAD_PREFIXES = ("Logits_", "predictions/", "conv_preds/")


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


def _format(path: pathlib.Path) -> str:
  return "slim" if path.suffix.lower() == ".npz" else "keras"


def pretrained(name: str, source, *, num_classes: int = 0, head=None, seed: int = 0,
               **model_options):
  """Builds ``jcv.models.create(name, ...)`` and loads pretrained weights into it, strictly.

  Args:
    name: model name, e.g. ``"mobilenet_v2"``.
    source: local ``.npz`` (TF-slim arrays) / Keras ``.h5`` file, or a known download name.
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
  from jcv.models import mobilenet  # noqa: F401  (registers the MobileNets)

  path, implied = _resolve_source(name, source)
  fmt = _format(path)
  if (name, fmt) not in NAME_MAPS:
    known = ", ".join(f"{m} ({f})" for m, f in sorted(NAME_MAPS))
    raise ValueError(f"no {fmt} name map for {name!r}; ports exist for: {known}")
  options = {**implied, **model_options}
  arrays = read_arrays(path)
  head_arrays = None
  if head is not None:
    head_arrays = load_head(head)
    classes = head_arrays["kernel"].shape[-1]
    if num_classes != classes:
      raise ValueError(f"head file {head} has {classes} classes; pass num_classes={classes}")
    arrays = {k: v for k, v in arrays.items() if not k.startswith(_HEAD_PREFIXES)}
  model = jcv.models.create(name, num_classes=num_classes, **options)
  key = jax.random.key(seed)
  file_has_head = any(k.startswith(_HEAD_PREFIXES) for k in arrays)
  file_head_fits = file_has_head and num_classes > 0 and _head_classes(arrays) == num_classes
  keep_head = num_classes > 0 and head_arrays is None and not file_head_fits
  init = functools.partial(model.init, {"params": key, "dropout": key},
                           jnp.zeros((1, 32, 32, 3), jnp.float32))
  template = jax.eval_shape(init)  # shapes only: compiling the whole init is slow on CPU
  if keep_head:
    template = _with_fresh_head(template, key)
  name_map = NAME_MAPS[(name, fmt)]
  if head_arrays is not None:
    base_map = name_map
    name_map = lambda p: ((f"__head__/{p[-1]}", False) if p[1] == "head" else base_map(p))  # noqa: E731
    arrays = {**arrays, **{f"__head__/{k}": v for k, v in head_arrays.items()}}
  variables = port_variables(
      template, arrays, name_map, source=str(path),
      keep=(lambda p: p[1] == "head") if keep_head else None,
      ignore=(lambda n: n.startswith(_HEAD_PREFIXES)) if not file_head_fits else None)
  return model, jax.tree.map(jnp.asarray, variables)


def _with_fresh_head(template, key):
  """Initialises the ``head`` Dense of a jcv model (lecun-normal kernel, zero bias)."""
  import flax.linen as nn
  kernel = template["params"]["head"]["kernel"]
  dense = nn.Dense(kernel.shape[-1], dtype=kernel.dtype)
  head = dense.init(key, jnp.zeros((1, kernel.shape[0]), kernel.dtype))["params"]
  return {**template, "params": {**template["params"], "head": head}}


def _head_classes(arrays) -> int | None:
  for name in ("Logits_Conv2d_1c_1x1_biases", "predictions/bias", "conv_preds/bias"):
    if name in arrays:
      return int(arrays[name].shape[-1])
  return None


def imagenet_labels(path) -> list[str]:
  """Reads a label file with one class name per line (e.g. ``imagenet_labels_1001.txt``)."""
  return [line.strip() for line in pathlib.Path(path).read_text().splitlines() if line.strip()]

