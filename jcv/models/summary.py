"""Model summaries: parameter counts, a per-layer table and MACs from XLA's cost analysis.

Nothing is compiled or executed: shapes come from ``jax.eval_shape`` and costs from
``jax.jit(...).lower(...).cost_analysis()`` (XLA's HLO cost model of the unoptimised graph).
From a shell: ``python -c "import jcv.models as M; M.summary('resnet50', input_size=160)"``.

MACs are counted for convolutions and dense layers (flops / 2 of each layer without its
bias), the convention of papers and model zoos. XLA counts only the multiply-adds that touch
the image, not the zero padding, so its MACs are a few percent below the "nominal" count
papers quote (kernel size x output size, padding included), which is given next to them
(ResNet-50: 3.95 G measured by XLA, 4.09 G nominal). The total forward FLOPs of the whole
graph (BN, activations and pooling included) are reported as well.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcv.models.layers import Conv, ConvBNAct, xla_kernels
from jcv.models.registry import create, get_card

__all__ = ["count_params", "layer_table", "measure_macs", "summary"]

_LEAVES = (ConvBNAct, Conv, nn.Dense, nn.BatchNorm)


def _resolve(model_or_name, input_size, options):
  if isinstance(model_or_name, str):
    card = get_card(model_or_name)
    return create(model_or_name, **options), input_size or card.input_size
  if options:
    raise ValueError("options are only accepted with a model name, not a module")
  if input_size is None:
    raise ValueError("input_size is required when passing a module instead of a model name")
  return model_or_name, input_size


def _init_shapes(model, x_spec, interceptor=None):
  def init():
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return model.init(rngs, jnp.zeros(x_spec.shape, x_spec.dtype), train=False)
  if interceptor is None:
    return jax.eval_shape(init)
  with nn.intercept_methods(interceptor):
    return jax.eval_shape(init)


def _size(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def count_params(model_or_name, *, input_size: int | None = None, collection: str = "params",
                 **options) -> int:
  """Number of scalars in a variable collection (``'params'``: trainable; ``'batch_stats'``).

  Uses ``jax.eval_shape`` (no compilation, no memory). ``model_or_name`` is a registered
  name (then ``options`` go to :func:`jcv.models.create`) or a module with ``input_size``.
  """
  model, size = _resolve(model_or_name, input_size, options)
  variables = _init_shapes(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return _size(variables.get(collection, {}))


def _subtree(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def _layer_macs(module, params, in_shape, in_dtype, memo):
  """MACs of one Conv/Dense call from XLA's cost analysis (bias excluded)."""
  key = (repr(module), in_shape, str(in_dtype), tuple(jax.tree.map(lambda a: a.shape, params).items()))
  if key not in memo:
    extra = {"conv": None} if isinstance(module, Conv) else {}
    bare = module.clone(parent=None, use_bias=False, **extra)
    p = {"kernel": params["kernel"]}
    with xla_kernels():  # XLA counts its own convs (not the oneDNN custom calls)
      lowered = jax.jit(lambda p, x: bare.apply({"params": p}, x)).lower(
          p, jax.ShapeDtypeStruct(in_shape, in_dtype))
    memo[key] = int(lowered.cost_analysis().get("flops", 0)) // 2
  return memo[key]


def _nominal_macs(params, output_shape):
  # Every kernel weight is used once per output position (padding taps included).
  return math.prod(params["kernel"].shape) * math.prod(output_shape[:-1])


def layer_table(model_or_name, *, input_size: int | None = None, batch_size: int = 1,
                **options) -> list[dict[str, Any]]:
  """One row per layer (ConvBNAct, or a bare Conv/Dense/BatchNorm) in call order.

  Each row: ``path``, ``type``, ``output`` shape, ``params``, ``macs`` (XLA's cost analysis)
  and ``nominal_macs`` (kernel size x output positions), per batch of ``batch_size``; a
  ConvBNAct's MACs are its convolution's.
  """
  model, size = _resolve(model_or_name, input_size, options)
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, _LEAVES)
        and not (calls and calls[-1]["path"] == tuple(module.scope.path))):  # jcv's BatchNorm calls nn.BatchNorm's
      x = args[0]
      calls.append(dict(path=tuple(module.scope.path), module=module.clone(parent=None),
                        in_shape=tuple(x.shape), in_dtype=x.dtype, output=tuple(out.shape)))
    return out

  x_spec = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  variables = _init_shapes(model, x_spec, interceptor)
  params = variables["params"]
  memo = {}
  rows, by_path = [], {}
  for call in sorted(calls, key=lambda c: len(c["path"])):  # parents before their children
    parent = by_path.get(call["path"][:-1])
    if parent is not None:  # the conv (and BN) inside a ConvBNAct: fold into its row
      if isinstance(call["module"], Conv):
        conv_params = _subtree(params, call["path"])
        parent["macs"] += _layer_macs(call["module"], conv_params, call["in_shape"],
                                      call["in_dtype"], memo)
        parent["nominal_macs"] += _nominal_macs(conv_params, call["output"])
      continue
    try:
      layer_params = _subtree(params, call["path"])
    except KeyError:
      layer_params = {}
    row = dict(path="/".join(call["path"]), type=type(call["module"]).__name__,
               output=call["output"], params=_size(layer_params), macs=0, nominal_macs=0,
               order=len(rows))
    if isinstance(call["module"], (Conv, nn.Dense)):
      row["macs"] = _layer_macs(call["module"], layer_params, call["in_shape"], call["in_dtype"], memo)
      row["nominal_macs"] = _nominal_macs(layer_params, call["output"])
    by_path[call["path"]] = row
    rows.append(row)
  # Back to call order: a child's index in ``calls`` is before its parent's (it returns first).
  order = {tuple(c["path"]): i for i, c in enumerate(calls)}
  rows.sort(key=lambda r: order[tuple(r["path"].split("/"))])
  for row in rows:
    row.pop("order")
  return rows


def measure_macs(model_or_name, *, input_size: int | None = None, batch_size: int = 1,
                 **options) -> dict[str, int]:
  """MACs of the forward pass (convolutions + dense) and XLA's total forward FLOPs.

  Returns ``{"macs": ..., "nominal_macs": ..., "flops": ...}`` per batch of ``batch_size`` at ``input_size`` px
  (the model card's by default). Computed on demand, nothing is cached between calls.
  """
  model, size = _resolve(model_or_name, input_size, options)
  rows = layer_table(model, input_size=size, batch_size=batch_size)
  return {"macs": sum(r["macs"] for r in rows), "nominal_macs": sum(r["nominal_macs"] for r in rows),
          "flops": _forward_flops(model, size, batch_size)}


def _forward_flops(model, size, batch_size):
  x_spec = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  variables = _init_shapes(model, x_spec)
  with xla_kernels():  # XLA's cost model counts its own convs, not custom calls
    lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x_spec)
  return int(lowered.cost_analysis().get("flops", 0))


def _fmt(n: float) -> str:
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{unit}"
  return str(int(n))


def summary(name: str, *, input_size: int | None = None, print_fn=print, **options) -> str:
  """Prints (and returns) the model card and a per-layer table: output shape, params, MACs.

  ``options`` go to :func:`jcv.models.create` (e.g. ``num_classes``); ``print_fn=None``
  only returns the text.
  """
  if input_size is not None and input_size < 1:
    raise ValueError(f"input size must be a positive number of pixels, got {input_size}")
  card = get_card(name)
  model, size = _resolve(name, input_size, options)
  rows = layer_table(model, input_size=size)
  variables = _init_shapes(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  trainable, stats = _size(variables["params"]), _size(variables.get("batch_stats", {}))
  macs = sum(r["macs"] for r in rows)
  nominal = sum(r["nominal_macs"] for r in rows)
  flops = _forward_flops(model, size, 1)
  path_w = max([len(r["path"]) for r in rows] + [5])
  type_w = max([len(r["type"]) for r in rows] + [4])
  header = (f"{'layer':<{path_w}}  {'type':<{type_w}}  {'output':<16}  {'params':>12}  "
            f"{'MACs (XLA)':>10}  {'nominal':>9}")
  lines = [card.describe(), "", header, "-" * len(header)]
  for r in rows:
    shape = "x".join(str(d) for d in r["output"][1:])
    lines.append(f"{r['path']:<{path_w}}  {r['type']:<{type_w}}  {shape:<16}  {r['params']:>12,}  "
                 f"{_fmt(r['macs']):>10}  {_fmt(r['nominal_macs']):>9}")
  lines += ["-" * len(header),
            f"input {size}x{size}x3, batch 1: {trainable:,} trainable params, {stats:,} BN "
            f"statistics",
            f"MACs (conv + dense): {_fmt(macs)} by XLA's cost analysis, {_fmt(nominal)} nominal "
            f"(padding included); forward FLOPs (XLA, all ops): {_fmt(flops)}"]
  if card.reference_params is not None and options.get("num_classes") in (None, card.default_num_classes):
    status = "matches" if card.reference_params == trainable else "DIFFERS FROM"
    lines.append(f"trainable params {status} the reference {card.reference_params:,}")
  text = "\n".join(lines)
  if print_fn is not None:
    print_fn(text)
  return text

