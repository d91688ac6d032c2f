"""Activations with a hand-written gradient: one fused pass forward and one backward.

:func:`gelu` is the exact GELU, ``x * Phi(x)``, in the erf form PyTorch's ``nn.GELU`` computes
(``0.5 x (1 + erf(x / sqrt 2))``). ``jax.nn.gelu(approximate=False)`` writes it with ``erfc``,
which XLA:CPU expands into both of its branches and splits over four passes forward and more
backward (bfloat16 [32, 7, 7, 256], forward + gradient: 1.38 ms against 0.48 ms for this one,
2-core Xeon, 2026-12-07). Values agree to 1e-6 in float32; the arithmetic is float32 for
bfloat16 inputs too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["gelu"]

_F32 = jnp.float32
_SQRT_HALF = np.float32(np.sqrt(0.5))
_INV_SQRT_2PI = np.float32(1 / np.sqrt(2 * np.pi))


@jax.custom_vjp
def gelu(x):
  """Exact GELU ``0.5 x (1 + erf(x / sqrt 2))``, computed in float32, returned in ``x.dtype``."""
  xf = x.astype(_F32)
  return (0.5 * xf * (1 + jax.lax.erf(xf * _SQRT_HALF))).astype(x.dtype)


def _forward(x):
  return gelu(x), x


def _backward(x, dy):
  xf = x.astype(_F32)  # d/dx x Phi(x) = Phi(x) + x phi(x)
  slope = 0.5 * (1 + jax.lax.erf(xf * _SQRT_HALF)) + xf * _INV_SQRT_2PI * jnp.exp(-0.5 * xf * xf)
  return ((dy.astype(_F32) * slope).astype(x.dtype),)


gelu.defvjp(_forward, _backward)
