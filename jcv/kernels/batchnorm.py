"""BatchNorm with an optional fused ReLU / ReLU6, and a hand-written training gradient on CPU.

:class:`BatchNorm` is Flax's ``nn.BatchNorm`` (same fields, variables and numbers: the fast
variance ``E[x^2] - E[x]^2`` with float32 statistics) plus two fields, ``act`` (None, "relu",
"relu6", applied to the output) and ``lowering`` (the conv lowering it follows, see
:mod:`jcv.kernels.dispatch`; None: the default). In training mode with the ``"onednn"``
lowering (the CPU default where jcv's native library builds) it calls :func:`batch_norm_train`, a
``jax.custom_vjp`` whose forward and backward are two passes over the activations each, a
reduction and an elementwise pass:

* forward: per-channel ``sum(x), sum(x*x)``; then ``y = act(x * a + b)``;
* backward: ``sum(dz), sum(dz * (x - mean))`` with ``dz = dy * act'(y)``; then
  ``dx = a * dz + k * (x - mean) + c``;

where XLA's autodiff of the same function materialises ``x - mean`` and the pre-activation
in more passes. The two reductions are the multi-threaded C++ kernels of ``native_bn.cc``
(built into jcv's oneDNN library; XLA:CPU runs such a reduction on one thread), partitioned
over the batch under a sharded ``jit`` (the sums are psum-ed), jnp under ``vmap``; the
elementwise passes stay with XLA, which fuses them with their neighbours. With the other
lowerings (``"cpu"``: the jnp version measured slower than XLA's autodiff; GPU/TPU), with
``axis_name`` (per-device SPMD), a mask, another axis or an output dtype other than the
input's, it is exactly ``nn.BatchNorm`` followed by the activation.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcv.kernels import native
from jcv.kernels.dispatch import resolve
from jcv.kernels.sharding import batch_axis, varying_like

__all__ = ["ACTIVATIONS", "BatchNorm", "FUSABLE", "activation", "activation_name", "batch_norm_train", "is_fusable"]

ACTIVATIONS = (None, "relu", "relu6")
_CODES = {None: 0, "relu": 1, "relu6": 2}
_F32 = jnp.float32


_NAMED = (("relu", nn.relu), ("relu6", nn.relu6), ("relu", jax.nn.relu), ("relu6", jax.nn.relu6))
FUSABLE = tuple(f for _, f in _NAMED)  # the activation functions kernels apply themselves


def is_fusable(fn) -> bool:
  """Whether ``fn`` is one of :data:`FUSABLE` (identity, not equality)."""
  return any(fn is f for f in FUSABLE)


def activation_name(fn) -> str | None:
  """"relu" / "relu6" / None for ``nn.relu`` / ``nn.relu6`` / None; raises for anything else."""
  for name, f in _NAMED:
    if fn is f:
      return name
  if fn is None:
    return None
  raise ValueError(f"no fused form of activation {fn!r}")


def activation(z, act: str | None):
  """``act`` ("relu", "relu6" or None) applied to ``z``."""
  if act == "relu6":
    return jnp.clip(z, 0, 6)
  return jnp.maximum(z, 0) if act == "relu" else z


def _dz(dy, y, act):
  dy = dy.astype(_F32)
  if act is None:
    return dy
  on = (y > 0) & (y < 6) if act == "relu6" else y > 0
  return jnp.where(on, dy, 0)


# The four passes in jnp (any backend); the two reductions also native. --------------------

def _axes(x):
  return tuple(range(x.ndim - 1))


def _stats_jnp(x, act=None):
  xf = x.astype(_F32)
  return jnp.stack([xf.sum(_axes(x)), (xf * xf).sum(_axes(x))])


def _apply_jnp(x, coef, act):
  return activation(x.astype(_F32) * coef[0] + coef[1], act).astype(x.dtype)


def _bwd_stats_jnp(dy, y, x, mean, act):
  dz = _dz(dy, y, act)
  return jnp.stack([dz.sum(_axes(x)), (dz * (x.astype(_F32) - mean)).sum(_axes(x))])


def _bwd_apply_jnp(dy, y, x, coef, act):
  dz = _dz(dy, y, act)
  return (coef[0] * dz + coef[1] * (x.astype(_F32) - coef[3]) + coef[2]).astype(x.dtype)


_JNP = (_stats_jnp, _apply_jnp, _bwd_stats_jnp, _bwd_apply_jnp)


@functools.lru_cache(maxsize=None)
def _native(kind: int, act, ndim: int):
  """The FFI call of reduction ``kind`` (0 or 2): batch-partitioned under a sharded jit (the
  per-device sums are psum-ed), the jnp pass under vmap."""
  from jax.experimental.custom_partitioning import custom_partitioning
  from jax.sharding import NamedSharding, PartitionSpec as P
  native.require()  # builds and registers the FFI targets on first use
  target, n_act = native.BN_TARGETS[kind // 2], 1 if kind == 0 else 3
  attrs = {} if kind == 0 else {"act": np.int64(_CODES[act])}

  def plain(*args):
    x = args[n_act - 1]
    out = jax.ShapeDtypeStruct((2, x.shape[-1]), _F32)
    return varying_like(jax.ffi.ffi_call(target, out, vmap_method="sequential")(*args, **attrs), *args)

  def infer(mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, P())  # the sums are replicated

  def partition(mesh, arg_shapes, result_shape):
    axis = batch_axis(arg_shapes[0].sharding)
    args = tuple(NamedSharding(mesh, P(axis) if i < n_act else P()) for i in range(len(arg_shapes)))

    def lower(*xs):
      out = plain(*xs)
      return jax.lax.psum(out, axis) if axis is not None else out
    return mesh, lower, NamedSharding(mesh, P()), args

  dims = ["n"] + [f"d{i}" for i in range(1, ndim - 1)] + ["c"]
  operands = ", ".join([" ".join(dims)] * n_act + ([] if kind == 0 else ["c"]))
  partitioned = custom_partitioning(plain)
  partitioned.def_partition(partition, infer_sharding_from_operands=infer,
                            sharding_rule=f"{operands} -> u c", reduction_factors=("n",),
                            need_replication_factors=tuple(dims[1:]) + ("u",))

  @jax.custom_batching.custom_vmap
  def op(*args):
    return partitioned(*args)

  @op.def_vmap
  def _(axis_size, in_batched, *args):
    del axis_size
    fn = functools.partial(_JNP[kind], act=act)
    return jax.vmap(fn, in_axes=tuple(0 if b else None for b in in_batched))(*args), True
  return op


def _pass(kind, native, act, *args):
  if native and kind in (0, 2):
    return _native(kind, act, args[0].ndim)(*args)
  return _JNP[kind](*args, act=act)


# The custom gradient. -------------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, epsilon: float, act=None, native: bool = False):
  """Training-mode BatchNorm over all axes but the last, then ``act``: ``(y, mean, var)``.

  ``x`` float32 or bfloat16 (statistics in float32), ``scale``/``bias`` float32 [C]; ``var`` is
  the biased batch variance ``E[x^2] - E[x]^2`` (clipped at 0), as Flax's. ``native``: the C++
  reductions (needs :func:`jcv.kernels.native.available`), else jnp.
  """
  return _forward(x, scale, bias, epsilon, act, native)[0]


def _forward(x, scale, bias, epsilon, act, native):
  if act not in _CODES:
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
  count = x.size // x.shape[-1]
  sums = _pass(0, native, act, x)
  mean = sums[0] / count
  var = jnp.maximum(sums[1] / count - mean * mean, 0)
  invstd = jax.lax.rsqrt(var + epsilon)
  a = scale.astype(_F32) * invstd
  y = _pass(1, native, act, x, jnp.stack([a, bias.astype(_F32) - mean * a]))
  return (y, mean, var), (x, y, mean, invstd, scale, bias)


def _backward(epsilon, act, native, residuals, cotangents):
  x, y, mean, invstd, scale, bias = residuals
  dy, dmean, dvar = cotangents
  count = x.size // x.shape[-1]
  sums = _pass(2, native, act, dy, y, x, mean)
  dbias, dscale = sums[0], sums[1] * invstd  # sum(dz), sum(dz * xhat)
  a = scale.astype(_F32) * invstd
  # dx = a (dz - sum(dz)/m - xhat sum(dz xhat)/m) + dmean/m + 2 dvar (x - mean)/m
  k = -a * invstd * dscale / count + 2 * dvar / count
  c = -a * dbias / count + dmean / count
  dx = _pass(3, native, act, dy, y, x, jnp.stack([a, k, c, mean]))
  return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


batch_norm_train.defvjp(_forward, _backward)


# The module. ----------------------------------------------------------------------------

class BatchNorm(nn.BatchNorm):
  """``nn.BatchNorm`` + ``act`` ("relu", "relu6" or None), with :func:`batch_norm_train` as the
  training step under the "onednn" lowering (``lowering``: a conv lowering name, None = the
  default).
  Variables, defaults and results are ``nn.BatchNorm``'s."""
  act: str | None = None
  lowering: str | None = None

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if self.act not in _CODES:
      raise ValueError(f"act must be one of {ACTIVATIONS}, got {self.act!r}")
    train = not nn.merge_param("use_running_average", self.use_running_average, use_running_average)
    lowering = resolve(self.lowering)
    out_dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    if (not train or mask is not None or lowering != "onednn" or self.is_initializing()
        or self.axis_name is not None or self.axis not in (-1, x.ndim - 1) or x.ndim < 2
        or not self.force_float32_reductions or jnp.dtype(out_dtype) != x.dtype
        or x.dtype not in (jnp.float32, jnp.bfloat16)):
      return activation(super().__call__(x, use_running_average, mask=mask), self.act)
    features = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, _F32), (features,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, _F32), (features,))
    scale = (self.param("scale", self.scale_init, (features,), self.param_dtype) if self.use_scale
             else jnp.ones((features,), _F32))
    bias = (self.param("bias", self.bias_init, (features,), self.param_dtype) if self.use_bias
            else jnp.zeros((features,), _F32))
    y, mean, var = batch_norm_train(x, scale, bias, float(self.epsilon), self.act, lowering == "onednn")
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * jax.lax.stop_gradient(mean)
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * jax.lax.stop_gradient(var)
    return y
