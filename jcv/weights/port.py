"""Strict weight porting: named arrays from a file -> a Flax variables tree.

A *name map* turns the path of every Flax leaf, e.g.
``("params", "block_3", "expand", "conv", "kernel")``, into the name of one source array
(``"expanded_conv_3_expand_weights"`` in TF-slim files, ``"block_3_expand/kernel"`` in Keras
``.h5`` files) and says whether a reshape is allowed (depthwise kernels are stored
(kh, kw, C, 1) but Flax wants (kh, kw, 1, C)). Porting is strict: every Flax leaf needs
exactly one source array of the right shape, and every source array must be used; otherwise
:class:`PortError` lists the missing, unexpected and mismatched names.

A new family (e.g. ResNet-50 from Keras or torchvision files) is one more name-map function
registered in :data:`NAME_MAPS`; the reading, checking and loading code is shared.
"""
from __future__ import annotations

import pathlib
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

from jcv.weights.files import check_weight_file

__all__ = [
    "NAME_MAPS", "PortError", "load_head", "port_variables", "read_arrays",
    "keras_mobilenet_v1_name", "keras_mobilenet_v2_name", "slim_mobilenet_v2_name",
]

Path = tuple[str, ...]
# A name map: Flax leaf path -> (source array name, reshape allowed) or None for "not in file".
NameMap = Callable[[Path], "tuple[str, bool] | None"]


class PortError(ValueError):
  """Raised when a weight file does not fit a model exactly."""

  def __init__(self, source: str, *, missing=(), unexpected=(), mismatched=()):
    self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
    parts = [f"weights in {source} do not match the model:"]
    for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                         ("mismatched shapes", self.mismatched)):
      if items:
        shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
        parts.append(f"{len(items)} {title}: {shown}")
    super().__init__("\n  ".join(parts))


# --------------------------------------------------------------------------- reading files

def read_arrays(path) -> dict[str, np.ndarray]:
  """Reads every named array of a ``.npz`` (no pickle) or a Keras ``.h5`` weight file.

  Keras names are ``"<layer>/<weight>"`` with the ``:0`` suffix dropped, e.g. ``"Conv1/kernel"``.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weight file not found: {path}")
  check_weight_file(path)  # a damaged, truncated, pickled or non-finite file: ValueError naming it
  suffix = path.suffix.lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as data:
      return {name: np.asarray(data[name]) for name in data.files}
  if suffix in (".h5", ".hdf5", ".keras"):
    return _read_keras_h5(path)
  raise ValueError(f"unsupported weight file {path.name!r}: expected a .npz or a Keras .h5 file")


def _read_keras_h5(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import h5py
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("reading Keras .h5 weight files needs h5py: pip install h5py") from e
  arrays = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
      raise ValueError(f"{path.name} is not a Keras HDF5 weight file (no 'layer_names' attribute); "
                       "save it with model.save_weights('file.h5') in the legacy format")
    for layer in _decode(root.attrs["layer_names"]):
      group = root[layer]
      for weight in _decode(group.attrs.get("weight_names", [])):
        short = weight.split("/")[-1].split(":")[0]
        arrays[f"{layer}/{short}"] = np.asarray(group[weight])
  return arrays


def _decode(names: Iterable) -> list[str]:
  return [n.decode("utf8") if isinstance(n, bytes) else str(n) for n in names]


def load_head(path) -> dict[str, np.ndarray]:
  """Reads a classifier head file: ``kernel`` [F, K] and ``bias`` [K].

  Accepts float ``kernel`` (stored [F, K] or [K, F] is not guessed: [F, K] only) or the int8
  form ``kernel_int8`` [K, F] with per-class ``kernel_scale`` [K], as in ../shared/weights.
  """
  arrays = read_arrays(path)
  if {"kernel_int8", "kernel_scale", "bias"} <= set(arrays):
    kernel = arrays["kernel_int8"].astype(np.float32) * arrays["kernel_scale"][:, None]
    return {"kernel": kernel.T.copy(), "bias": arrays["bias"].astype(np.float32)}
  if {"kernel", "bias"} <= set(arrays):
    return {"kernel": arrays["kernel"].astype(np.float32), "bias": arrays["bias"].astype(np.float32)}
  raise ValueError(f"head file {path} must hold 'kernel' and 'bias', or 'kernel_int8', "
                   f"'kernel_scale' and 'bias'; found {sorted(arrays)}")


# --------------------------------------------------------------------------- name maps

_BN_SLIM = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}


def _split(path: Path):
  """("params", "block_3", "expand", "bn", "scale") -> ("block_3", "expand", "bn", "scale")."""
  return path[1:]


def slim_mobilenet_v2_name(path: Path):
  """Name map for the TF-slim MobileNetV2 arrays (``mobilenet_v2_1.0_224_backbone.npz``)."""
  parts = _split(path)
  if parts[0] == "head":
    return {"kernel": ("Logits_Conv2d_1c_1x1_weights", True),
            "bias": ("Logits_Conv2d_1c_1x1_biases", False)}[parts[-1]]
  stage, leaf = parts[0], parts[-1]
  if stage == "stem":
    prefix = "Conv"
  elif stage == "last_conv":
    prefix = "Conv_1"
  else:
    index = int(stage.split("_")[1])
    prefix = "expanded_conv" if index == 0 else f"expanded_conv_{index}"
    prefix += "_" + parts[1]
  if parts[-2] == "conv":
    depthwise = len(parts) == 4 and parts[1] == "depthwise"
    return (prefix + ("_depthwise_weights" if depthwise else "_weights"), depthwise)
  return (f"{prefix}_BatchNorm_{_BN_SLIM[leaf]}", False)


def _keras_leaf(parts, conv_layer: str, bn_layer: str, depthwise: bool):
  leaf = parts[-1]
  if parts[-2] == "conv":
    return (f"{conv_layer}/{'depthwise_kernel' if depthwise else 'kernel'}", depthwise)
  return (f"{bn_layer}/{_BN_SLIM[leaf]}", False)


def keras_mobilenet_v2_name(path: Path):
  """Name map for ``keras.applications.MobileNetV2`` ``.h5`` files (any width, top or no top)."""
  parts = _split(path)
  if parts[0] == "head":
    return (f"predictions/{parts[-1]}", False)
  stage = parts[0]
  if stage == "stem":
    return _keras_leaf(parts, "Conv1", "bn_Conv1", False)
  if stage == "last_conv":
    return _keras_leaf(parts, "Conv_1", "Conv_1_bn", False)
  index, sub = int(stage.split("_")[1]), parts[1]
  layer = f"expanded_conv_{sub}" if index == 0 else f"block_{index}_{sub}"
  return _keras_leaf(parts, layer, layer + "_BN", sub == "depthwise")


def keras_mobilenet_v1_name(path: Path):
  """Name map for ``keras.applications.MobileNet`` ``.h5`` files (the classifier is a 1x1 conv)."""
  parts = _split(path)
  if parts[0] == "head":
    return (f"conv_preds/{parts[-1]}", parts[-1] == "kernel")
  if parts[0] == "stem":
    return _keras_leaf(parts, "conv1", "conv1_bn", False)
  index, sub = int(parts[0].split("_")[1]) + 1, parts[1]
  layer = f"conv_dw_{index}" if sub == "depthwise" else f"conv_pw_{index}"
  return _keras_leaf(parts, layer, layer + "_bn", sub == "depthwise")


# (model name, file format) -> name map. Formats: "slim" (npz of TF-slim arrays), "keras" (.h5).
NAME_MAPS: dict[tuple[str, str], NameMap] = {
    ("mobilenet_v2", "slim"): slim_mobilenet_v2_name,
    ("mobilenet_v2", "keras"): keras_mobilenet_v2_name,
    ("mobilenet_v1", "keras"): keras_mobilenet_v1_name,
}


# --------------------------------------------------------------------------- loading

def _leaf_name(path) -> Path:
  return tuple(str(getattr(k, "key", k)) for k in path)


def port_variables(template: Mapping, arrays: Mapping[str, np.ndarray], name_map: NameMap, *,
                   source: str = "file", keep: Callable[[Path], bool] | None = None,
                   ignore: Callable[[str], bool] | None = None):
  """Fills ``template`` (variables or their ``jax.eval_shape``) from ``arrays``, strictly.

  ``keep(path)`` true: that leaf keeps the template's value (e.g. a freshly initialised head);
  ``ignore(name)`` true: that source array may stay unused (e.g. the ImageNet classifier
  when only the backbone is wanted). Everything else must match one-to-one.
  Returns a new tree of ``numpy`` arrays (template leaves kept as they are).
  """
  used, missing, mismatched = set(), [], []
  flat, treedef = jax.tree_util.tree_flatten_with_path(template)
  out = []
  for path, leaf in flat:
    path = _leaf_name(path)
    if keep is not None and keep(path):
      out.append(leaf)
      continue
    name, reshape = name_map(path)
    if name not in arrays:
      missing.append(name)
      out.append(leaf)
      continue
    if name in used:
      raise PortError(source, mismatched=[f"{name} (mapped twice, second time to {'/'.join(path)})"])
    used.add(name)
    value = arrays[name]
    if reshape and value.size == int(np.prod(leaf.shape)):
      value = value.reshape(leaf.shape)
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f"{name} {tuple(value.shape)} vs {'/'.join(path)} {tuple(leaf.shape)}")
    out.append(value.astype(leaf.dtype))
  unexpected = sorted(n for n in arrays if n not in used and not (ignore and ignore(n)))
  if missing or unexpected or mismatched:
    raise PortError(source, missing=missing, unexpected=unexpected, mismatched=mismatched)
  return jax.tree_util.tree_unflatten(treedef, out)
