"""Strict weight porting: named arrays from a file -> a Flax variables tree, by declared tables.

A family's port is a :class:`PortTable`: ordered :class:`Rule` s, each a regex over the Flax
leaf path (``"block_3/expand/conv/kernel"``), the source array's name
(``"_blocks.{0}._expand_conv.weight"``, the regex groups filled in) and its layout
(:data:`LAYOUTS`: ``"same"``, ``"reshape"``, ``"oihw"`` for PyTorch convs, ``"oi"`` for
PyTorch linear layers). Porting is strict: every Flax leaf needs exactly one source array of
the right shape, and every source array must be used (except those the table declares
ignorable, e.g. BatchNorm's ``num_batches_tracked``); otherwise :class:`PortError` lists the
missing, unexpected and mismatched names.

A new family is one more table registered in :data:`NAME_MAPS` under (model name, format);
reading (``.npz`` without pickle, Keras ``.h5``, PyTorch ``.pth`` through
``torch.load(weights_only=True)``), checking and loading are shared.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Callable, Iterable, Mapping

import jax
import numpy as np

from jcv.weights.files import check_weight_file

__all__ = [
    "FORMATS", "KERAS_MOBILENET_V1", "KERAS_MOBILENET_V2", "LAYOUTS", "NAME_MAPS", "PortError",
    "PortTable", "Rule", "SLIM_MOBILENET_V2", "TORCH_EFFICIENTNET_LITE", "batchnorm", "conv",
    "convert", "load_head", "port_variables", "read_arrays",
    "keras_mobilenet_v1_name", "keras_mobilenet_v2_name", "slim_mobilenet_v2_name",
]

Path = tuple[str, ...]
# A name map: Flax leaf path -> (source array name, layout). A layout is a LAYOUTS key (or,
# from older name maps, a bool: True = "reshape", False = "same").
NameMap = Callable[[Path], "tuple[str, str | bool]"]


class PortError(ValueError):
  """Raised when a weight file does not fit a model exactly."""

  def __init__(self, source: str, *, missing=(), unexpected=(), mismatched=(), hint: str = ""):
    self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
    parts = [f"weights in {source} do not match the model:"] + ([hint] if hint else [])
    for title, items in (("missing", self.missing), ("unexpected", self.unexpected),
                         ("mismatched shapes", self.mismatched)):
      if items:
        shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
        parts.append(f"{len(items)} {title}: {shown}")
    super().__init__("\n  ".join(parts))


# --------------------------------------------------------------------------- reading files

def read_arrays(path) -> dict[str, np.ndarray]:
  """Reads every named array of a ``.npz`` (no pickle), a Keras ``.h5`` or a PyTorch ``.pth`` file.

  Keras names are ``"<layer>/<weight>"`` with the ``:0`` suffix dropped, e.g. ``"Conv1/kernel"``;
  PyTorch names are the state dict's keys.
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
  if suffix in (".pth", ".pt"):
    return _read_torch(path)
  raise ValueError(f"unsupported weight file {path.name!r}: expected a .npz, a Keras .h5 or a "
                   "PyTorch .pth file")


def _read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  """A PyTorch state dict, loaded with ``weights_only=True`` (tensors and containers, no code)."""
  try:
    import torch
  except ImportError as e:
    raise ValueError(f"reading {path} needs PyTorch (pip install torch); or convert it once "
                      "where torch is installed: numpy.savez('file.npz', **{k: v.numpy() for k, v "
                      "in torch.load('file.pth', weights_only=True).items()})") from e
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - a pickle payload, a damaged or foreign file: one line
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise ValueError(f"weight file {path} cannot be read as PyTorch tensors ({reason}); jcv loads .pth "
                     "files with weights_only=True and never runs code they hold") from None
  for key in ("state_dict", "model"):  # training checkpoints nest the state dict
    if isinstance(state, dict) and isinstance(state.get(key), dict):
      state = state[key]
  if not isinstance(state, dict):
    raise ValueError(f"{path.name} holds a {type(state).__name__}, not a state dict of tensors")
  return {name: value.detach().cpu().numpy() for name, value in state.items()
          if isinstance(value, torch.Tensor)}


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


# --------------------------------------------------------------------------- port tables

# How a source array becomes a Flax leaf.
LAYOUTS = {
    "same": "stored as Flax wants it (shapes must be equal)",
    "reshape": "reshaped to the leaf when the sizes agree: TF depthwise (kh, kw, C, 1) -> "
               "(kh, kw, 1, C), a 1x1-conv classifier (1, 1, F, K) -> Dense (F, K)",
    "oihw": "PyTorch conv (out, in/groups, kh, kw) -> HWIO (kh, kw, in/groups, out); "
            "depthwise (C, 1, kh, kw) -> (kh, kw, 1, C)",
    "oi": "PyTorch linear (out, in) -> Dense (in, out)",
}


def convert(value: np.ndarray, layout: str, shape) -> np.ndarray:
  """``value`` in ``layout`` (a :data:`LAYOUTS` key) turned into the Flax leaf's layout.

  A wrong shape is left for the caller's check to report (nothing is guessed).
  """
  if layout == "oihw" and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if layout == "oi" and value.ndim == 2:
    return value.T
  if layout == "reshape" and value.size == int(np.prod(shape)):
    return value.reshape(shape)
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
  return value


@dataclasses.dataclass(frozen=True)
class Rule:
  """One line of a port table.

  ``pattern`` is a regex that must match a whole Flax leaf path without its collection
  (``"block_3/expand/conv/kernel"``, ``"stem/bn/mean"``); ``source`` is the source array's
  name, ``str.format``-ed with the pattern's groups (or a function of the groups, for names
  that need arithmetic); ``layout`` is a :data:`LAYOUTS` key.
  """
  pattern: str
  source: str | Callable[..., str]
  layout: str = "same"

  def source_name(self, path: str) -> str | None:
    """The source array's name for a Flax leaf path ("block_3/expand/conv/kernel"), or None."""
    match = re.fullmatch(self.pattern, path)
    if match is None:
      return None
    groups = match.groups()
    return self.source(*groups) if callable(self.source) else self.source.format(*groups)


def conv(prefix: str, source, layout: str = "same") -> Rule:
  """Rule for the kernel of the :class:`~jcv.models.layers.ConvBNAct` at ``prefix``."""
  return Rule(f"{prefix}/conv/kernel", source, layout)


def batchnorm(prefix: str, source: str, names: Mapping[str, str]) -> tuple[Rule, ...]:
  """Rules for the BatchNorm at ``prefix``: ``{bn}`` in ``source`` becomes the source's name of
  each of Flax's ``scale``, ``bias``, ``mean``, ``var`` (``names`` maps them)."""
  return tuple(Rule(f"{prefix}/bn/{leaf}", source.replace("{bn}", names[leaf]))
               for leaf in ("scale", "bias", "mean", "var"))


class PortTable:
  """A family's port, declared as data: ordered :class:`Rule` s (the first match wins).

  Called with a Flax leaf path it returns ``(source name, layout)``, the name-map interface of
  :func:`port_variables`. ``head``: regexes of the source arrays that belong to the ImageNet
  classifier (ignored when another head is asked for); ``ignore``: regexes of arrays that carry
  no model variable and may stay unused (PyTorch's BatchNorm ``num_batches_tracked``).
  """

  def __init__(self, description: str, rules: Iterable, *, head: Iterable[str] = (),
               ignore: Iterable[str] = ()):
    self.description = description
    self.rules = tuple(_flatten(rules))
    self.head = tuple(head)
    self.ignore = tuple(ignore)
    for rule in self.rules:
      if rule.layout not in LAYOUTS:
        raise ValueError(f"rule {rule.pattern!r}: unknown layout {rule.layout!r}")

  def __call__(self, path: Path) -> tuple[str, str]:
    leaf = "/".join(path[1:])  # without the collection ("params", "batch_stats")
    for rule in self.rules:
      name = rule.source_name(leaf)
      if name is not None:
        return name, rule.layout
    return f"<no rule for {leaf}>", "same"

  def is_head(self, name: str) -> bool:
    """Whether source array ``name`` belongs to the classifier head."""
    return any(re.search(p, name) for p in self.head)

  def is_ignorable(self, name: str) -> bool:
    """Whether source array ``name`` holds no model variable (may stay unused)."""
    return any(re.search(p, name) for p in self.ignore)

  def __repr__(self):
    return f"PortTable({self.description!r}, {len(self.rules)} rules)"


def _flatten(rules):
  for rule in rules:
    if isinstance(rule, Rule):
      yield rule
    else:
      yield from rule


_BN_SLIM = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_variance"}
_BN_TORCH = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}

# TF-slim MobileNetV2 arrays (mobilenet_v2_1.0_224_backbone.npz; ../shared/weights/README.md).
SLIM_MOBILENET_V2 = PortTable("TF-slim MobileNetV2 arrays", [
    conv("stem", "Conv_weights"), batchnorm("stem", "Conv_BatchNorm_{bn}", _BN_SLIM),
    conv("block_0/depthwise", "expanded_conv_depthwise_depthwise_weights", "reshape"),
    conv("block_0/project", "expanded_conv_project_weights"),
    batchnorm("block_0/(depthwise|project)", "expanded_conv_{0}_BatchNorm_{bn}", _BN_SLIM),
    conv(r"block_(\d+)/depthwise", "expanded_conv_{0}_depthwise_depthwise_weights", "reshape"),
    conv(r"block_(\d+)/(expand|project)", "expanded_conv_{0}_{1}_weights"),
    batchnorm(r"block_(\d+)/(expand|depthwise|project)", "expanded_conv_{0}_{1}_BatchNorm_{bn}",
              _BN_SLIM),
    conv("last_conv", "Conv_1_weights"), batchnorm("last_conv", "Conv_1_BatchNorm_{bn}", _BN_SLIM),
    Rule("head/kernel", "Logits_Conv2d_1c_1x1_weights", "reshape"),
    Rule("head/bias", "Logits_Conv2d_1c_1x1_biases"),
], head=("^Logits_",))

# keras.applications.MobileNetV2 .h5 files (any width, with or without the top).
KERAS_MOBILENET_V2 = PortTable("Keras applications MobileNetV2 (.h5)", [
    conv("stem", "Conv1/kernel"), batchnorm("stem", "bn_Conv1/{bn}", _BN_SLIM),
    conv("block_0/depthwise", "expanded_conv_depthwise/depthwise_kernel", "reshape"),
    conv("block_0/project", "expanded_conv_project/kernel"),
    batchnorm("block_0/(depthwise|project)", "expanded_conv_{0}_BN/{bn}", _BN_SLIM),
    conv(r"block_(\d+)/depthwise", "block_{0}_depthwise/depthwise_kernel", "reshape"),
    conv(r"block_(\d+)/(expand|project)", "block_{0}_{1}/kernel"),
    batchnorm(r"block_(\d+)/(expand|depthwise|project)", "block_{0}_{1}_BN/{bn}", _BN_SLIM),
    conv("last_conv", "Conv_1/kernel"), batchnorm("last_conv", "Conv_1_bn/{bn}", _BN_SLIM),
    Rule("head/(kernel|bias)", "predictions/{0}"),
], head=("^predictions/",))

# keras.applications.MobileNet .h5 files: Keras counts blocks from 1, the classifier is a 1x1 conv.
KERAS_MOBILENET_V1 = PortTable("Keras applications MobileNet (.h5)", [
    conv("stem", "conv1/kernel"), batchnorm("stem", "conv1_bn/{bn}", _BN_SLIM),
    conv(r"block_(\d+)/depthwise", lambda i: f"conv_dw_{int(i) + 1}/depthwise_kernel", "reshape"),
    conv(r"block_(\d+)/pointwise", lambda i: f"conv_pw_{int(i) + 1}/kernel"),
    *(Rule(rf"block_(\d+)/{sub}/bn/{leaf}", lambda i, s=short, n=name: f"conv_{s}_{int(i) + 1}_bn/{n}")
      for sub, short in (("depthwise", "dw"), ("pointwise", "pw")) for leaf, name in _BN_SLIM.items()),
    Rule("head/kernel", "conv_preds/kernel", "reshape"), Rule("head/bias", "conv_preds/bias"),
], head=("^conv_preds/",))

# PyTorch EfficientNet-Lite state dicts (lukemelas/EfficientNet-PyTorch naming, as
# efficientnet_lite2.npz in ../shared/weights): OIHW convs, (out, in) linear, torch BN names.
TORCH_EFFICIENTNET_LITE = PortTable("PyTorch EfficientNet-Lite state dict", [
    conv("stem", "_conv_stem.weight", "oihw"), batchnorm("stem", "_bn0.{bn}", _BN_TORCH),
    conv(r"block_(\d+)/expand", "_blocks.{0}._expand_conv.weight", "oihw"),
    batchnorm(r"block_(\d+)/expand", "_blocks.{0}._bn0.{bn}", _BN_TORCH),
    conv(r"block_(\d+)/depthwise", "_blocks.{0}._depthwise_conv.weight", "oihw"),
    batchnorm(r"block_(\d+)/depthwise", "_blocks.{0}._bn1.{bn}", _BN_TORCH),
    conv(r"block_(\d+)/project", "_blocks.{0}._project_conv.weight", "oihw"),
    batchnorm(r"block_(\d+)/project", "_blocks.{0}._bn2.{bn}", _BN_TORCH),
    conv("last_conv", "_conv_head.weight", "oihw"), batchnorm("last_conv", "_bn1.{bn}", _BN_TORCH),
    Rule("head/kernel", "_fc.weight", "oi"), Rule("head/bias", "_fc.bias"),
], head=(r"^_fc\.",), ignore=(r"\.num_batches_tracked$",))

# Earlier names of the MobileNet maps (same objects).
slim_mobilenet_v2_name = SLIM_MOBILENET_V2
keras_mobilenet_v2_name = KERAS_MOBILENET_V2
keras_mobilenet_v1_name = KERAS_MOBILENET_V1

# File formats and the suffixes that may hold them.
FORMATS = {"slim": (".npz",), "keras": (".h5", ".hdf5", ".keras"), "torch": (".npz", ".pth", ".pt")}

# (model name, file format) -> port table (or any name-map function).
NAME_MAPS: dict[tuple[str, str], NameMap] = {
    ("mobilenet_v2", "slim"): SLIM_MOBILENET_V2,
    ("mobilenet_v2", "keras"): KERAS_MOBILENET_V2,
    ("mobilenet_v1", "keras"): KERAS_MOBILENET_V1,
    **{(f"efficientnet_lite{i}", "torch"): TORCH_EFFICIENTNET_LITE for i in range(5)},
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
    name, layout = name_map(path)
    if isinstance(layout, bool):
      layout = "reshape" if layout else "same"
    if name not in arrays:
      missing.append(name)
      out.append(leaf)
      continue
    if name in used:
      raise PortError(source, mismatched=[f"{name} (mapped twice, second time to {'/'.join(path)})"])
    used.add(name)
    value = convert(np.asarray(arrays[name]), layout, leaf.shape)
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f"{name} {tuple(value.shape)} vs {'/'.join(path)} {tuple(leaf.shape)}")
    out.append(np.ascontiguousarray(value, dtype=leaf.dtype))
  table_ignore = getattr(name_map, "is_ignorable", None)
  unexpected = sorted(n for n in arrays if n not in used and not (ignore and ignore(n))
                      and not (table_ignore and table_ignore(n)))
  if missing or unexpected or mismatched:
    hint = ""
    if not used and arrays:
      what = getattr(name_map, "description", "this model")
      hint = (f"none of the file's {len(arrays)} arrays has a name a {what} file would have: "
              "is it the weights of another model?")
    raise PortError(source, missing=missing, unexpected=unexpected, mismatched=mismatched, hint=hint)
  return jax.tree_util.tree_unflatten(treedef, out)
