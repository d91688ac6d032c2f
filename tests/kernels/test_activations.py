"""jcv.kernels.gelu against float64 math and jax.nn.gelu's erfc form, values and gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcv.kernels import gelu

X = np.concatenate([np.linspace(-12, 12, 2001), [-40.0, -5.5, 0.0, 1e-4, 5.5, 40.0]]).astype(np.float32)


def _reference(x):
  """Float64 GELU and its derivative from math.erf."""
  phi = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
  return x * phi, phi + x * np.exp(-0.5 * x.astype(np.float64) ** 2) / math.sqrt(2 * math.pi)


def test_values_and_gradient_match_float64_in_float32():
  want, slope = _reference(X)
  np.testing.assert_allclose(gelu(jnp.asarray(X)), want, rtol=0, atol=2e-6)
  grad = jax.vmap(jax.grad(gelu))(jnp.asarray(X))
  np.testing.assert_allclose(grad, slope, rtol=0, atol=2e-6)
  np.testing.assert_allclose(grad, jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(X),
                             rtol=0, atol=2e-6)


def test_bfloat16_is_the_float32_result_rounded_once():
  x = jnp.asarray(X).astype(jnp.bfloat16)
  y = gelu(x)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(gelu(x.astype(jnp.float32)).astype(jnp.bfloat16), np.float32))
  dy = jnp.ones_like(x)
  grad = jax.vjp(gelu, x)[1](dy)[0]
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(grad, np.float32), _reference(np.asarray(x, np.float32))[1],
                             rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 5, 5, 7), (3,)])
def test_under_jit_and_vmap_equals_jax_nn_gelu(shape):
  x = jax.random.normal(jax.random.key(0), shape) * 3
  np.testing.assert_allclose(jax.jit(gelu)(x), jax.nn.gelu(x, approximate=False), rtol=0, atol=2e-6)
  np.testing.assert_allclose(jax.vmap(gelu)(x[None])[0], gelu(x), rtol=0, atol=0)
