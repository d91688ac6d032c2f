"""The inference form of a convolution: BatchNorm folded into its weights, bias and activation
(and a residual addition) applied by the convolution itself.

In inference mode BatchNorm is a per-channel affine map ``y * a + b`` with ``a = scale /
sqrt(var + eps)`` and ``b = bias - mean * a`` (:class:`BatchNormAffine`), so
``act(BN(conv(x, k)) + r) = act(conv(x, k * a) + b + r)``: one pass over the activations
instead of two or three. :func:`conv2d_bias_act` computes the right-hand side, on CPU as one
oneDNN convolution with a bias and post-ops (:func:`jcv.kernels.onednn.conv_bias_act`) where
:func:`jcv.kernels.conv2d` runs the layer on oneDNN, elsewhere as the same ops in jnp (XLA fuses
the bias, residual and activation into one pass).

Layers fold only inside :func:`fused_inference` (a JAX config option in ``jit``'s cache key, so a
function traced with it is not reused without it); jcv's own inference (``predict_logits``: the
evaluation in ``fit``, ``jcv evaluate``, ``jcv predict``), ``benchmarks/throughput.py``'s
inference rows and ``jcv.train``'s training step trace inside it. In training only the layers
whose BatchNorm is frozen (inference mode: ``frozen_bn_stages``, fine-tuning recipes) fold; the
fold is differentiable, so their kernels and BatchNorm scale and bias still train. The folded
model's logits equal the unfolded model's to 1e-4 relative in float32 (tests/kernels/test_fused.py,
every model family).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcv.kernels import onednn
from jcv.kernels.batchnorm import activation, activation_name, is_fusable
from jcv.kernels.dispatch import conv2d, onednn_pads
from jcv.kernels.geometry import pair

__all__ = ["BatchNormAffine", "conv2d_bias_act", "fused_inference", "fusing"]


def _make_state():
  try:
    from jax._src import config as jax_config
    return jax_config.bool_state(
        "jcv_fuse_inference", False, "Fold BatchNorm into convolutions in jcv's inference-mode layers.",
        include_in_jit_key=True, include_in_trace_context=True)
  except Exception:  # private API moved: a plain value (then enter it before jitting)
    return None


_STATE = _make_state()
_fallback = {"on": False}


def fusing() -> bool:
  """Whether inference-mode ConvBNAct layers traced now fold their BatchNorm."""
  return bool(_STATE.value if _STATE is not None else _fallback["on"])


@contextlib.contextmanager
def fused_inference(on: bool = True) -> Iterator[None]:
  """Context manager: inference-mode layers traced inside it run their folded form (``on``)."""
  if _STATE is not None:
    with _STATE(bool(on)):
      yield
    return
  previous, _fallback["on"] = _fallback["on"], bool(on)
  try:
    yield
  finally:
    _fallback["on"] = previous


class BatchNormAffine(nn.Module):
  """The variables of ``nn.BatchNorm`` (same names, shapes and initialisers) read as the
  inference-mode affine map: returns float32 ``(a, b)`` with ``BN(y) = y * a + b``."""
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones_init()
  bias_init: Callable = nn.initializers.zeros_init()
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: int):
    mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (features,)).value
    var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (features,)).value
    scale = self.param("scale", self.scale_init, (features,), self.param_dtype) if self.use_scale else 1.0
    bias = self.param("bias", self.bias_init, (features,), self.param_dtype) if self.use_bias else 0.0
    a = jnp.asarray(scale, jnp.float32) * jax.lax.rsqrt(var + self.epsilon)
    return a, jnp.asarray(bias, jnp.float32) - mean * a


def conv2d_bias_act(x, kernel, bias, *, act: Callable | None = None, residual=None, strides=(1, 1),
                    padding="SAME", groups: int = 1, dilation=(1, 1), lowering: str | None = None):
  """``act(conv2d(x, kernel) + bias + residual)`` (``residual`` None: no addition), in x's dtype.

  ``act``: None, ``nn.relu``, ``nn.relu6`` (applied inside oneDNN's call on CPU) or any other
  function (applied after it). ``bias`` float32 [cout]; the convolution's arguments and
  ``lowering`` are :func:`jcv.kernels.conv2d`'s.
  """
  fusable = act is None or is_fusable(act)
  pads = onednn_pads(x, kernel, strides=strides, padding=padding, groups=groups, dilation=dilation,
                     lowering=lowering)
  if pads is not None:
    name = activation_name(act) if fusable else None
    y = onednn.conv_bias_act(x, kernel, bias, residual, name, pair(strides, "strides"), pads,
                             pair(dilation, "dilation"), groups)
    return y if fusable else act(y)
  y = conv2d(x, kernel, strides=strides, padding=padding, groups=groups, dilation=dilation, lowering=lowering)
  y = y + bias.astype(y.dtype)
  if residual is not None:
    y = y + residual.astype(y.dtype)
  if fusable:
    return activation(y, activation_name(act))
  return act(y)
