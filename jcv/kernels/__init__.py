"""jcv.kernels: CPU speed behind one conv function and a fused BatchNorm.

:func:`conv2d` computes ``lax.conv_general_dilated`` (NHWC, HWIO) exactly, through the
lowering chosen per call or by default (:func:`lowering`, :func:`set_lowering`,
``$JCV_CONV_LOWERING``): oneDNN through XLA's FFI, exact jnp rewrites, or XLA's own
convolution. :func:`conv2d_bias_act` under :func:`fused_inference` is a layer's inference
form (BatchNorm folded in, bias, activation and residual as oneDNN post-ops). :class:`BatchNorm`
is ``nn.BatchNorm`` with a fused ReLU/ReLU6 and native reductions in training; :func:`max_pool`
follows the same lowering; :func:`gelu` is the exact GELU in one pass each way. Without a compiler everything runs on XLA, with one warning line
saying so (:func:`native.status`).
Models receive these through :mod:`jcv.models.layers`; nothing here imports ``jcv.models``.
"""
from jcv.kernels import native
from jcv.kernels.activations import gelu
from jcv.kernels.batchnorm import (ACTIVATIONS, BatchNorm, activation, activation_name, batch_norm_train,
                                  is_fusable)
from jcv.kernels.dispatch import (LOWERINGS, conv2d, get_lowering, lowering, make_conv, max_pool,
                                  resolve, resolved_lowering, set_lowering)
from jcv.kernels.fused import BatchNormAffine, conv2d_bias_act, fused_inference, fusing
from jcv.kernels.geometry import normalize_padding

__all__ = ["ACTIVATIONS", "BatchNorm", "BatchNormAffine", "LOWERINGS", "activation", "activation_name",
           "batch_norm_train", "conv2d", "conv2d_bias_act", "fused_inference", "fusing", "gelu", "get_lowering", "is_fusable",
           "lowering", "make_conv", "max_pool", "native", "normalize_padding", "resolve", "resolved_lowering",
           "set_lowering"]
