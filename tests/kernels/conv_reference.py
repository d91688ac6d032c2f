"""Shared by the convolution tests: the lax reference and seeded inputs for a test case
``(n, h, w, cin, cout, kh, kw, strides, padding, groups, dilation)``."""
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcv import kernels

DIMS = ("NHWC", "HWIO", "NHWC")


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def _reference(x, k, strides, padding, groups, dilation):
  padding = kernels.normalize_padding(padding, k.shape[:2])
  return lax.conv_general_dilated(x, k, _pair(strides), padding, rhs_dilation=_pair(dilation),
                                  dimension_numbers=DIMS, feature_group_count=groups)


def _inputs(case, dtype=jnp.float32, seed=0):
  n, h, w, cin, cout, kh, kw, *_, groups, _ = case
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, h, w, cin)).astype(np.float32)
  k = rng.normal(size=(kh, kw, cin // groups, cout)).astype(np.float32) / np.sqrt(kh * kw * cin / groups)
  return jnp.asarray(x, dtype), jnp.asarray(k, dtype)
