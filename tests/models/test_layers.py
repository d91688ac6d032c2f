"""Shared layers against NumPy references (and PyTorch's definitions where torch is installed)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcv.models import layers

RNG = np.random.default_rng(0)


def _np_pool(x, k, s, p, ceil_mode, reduce, count_include_pad=True):
  """Direct NumPy transcription of PyTorch's pooling definition (NHWC)."""
  n, h, w, c = x.shape
  oh = layers.pool_output_size(h, k, s, p, ceil_mode=ceil_mode)
  ow = layers.pool_output_size(w, k, s, p, ceil_mode=ceil_mode)
  out = np.zeros((n, oh, ow, c), x.dtype)
  for i, j in itertools.product(range(oh), range(ow)):
    r0, c0 = i * s - p, j * s - p
    r1, c1 = min(r0 + k, h + p), min(c0 + k, w + p)  # window clipped to the padded input
    rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    window = x[:, rr0:rr1, cc0:cc1]
    if reduce == "max":
      out[:, i, j] = window.max(axis=(1, 2))
    else:
      count = (r1 - r0) * (c1 - c0) if count_include_pad else (rr1 - rr0) * (cc1 - cc0)
      out[:, i, j] = window.sum(axis=(1, 2)) / count
  return out


@pytest.mark.parametrize("size,k,s,p,ceil,expected", [
    (112, 3, 2, 0, True, 56), (56, 3, 2, 0, True, 28), (14, 2, 2, 0, True, 7),  # GoogLeNet
    (112, 3, 2, 1, False, 56), (13, 3, 2, 0, False, 6), (14, 3, 2, 0, True, 7),
    (14, 3, 2, 0, False, 6), (5, 2, 2, 1, True, 3),  # last window would start in the right pad
])
def test_pool_output_size_follows_pytorch(size, k, s, p, ceil, expected):
  assert layers.pool_output_size(size, k, s, p, ceil_mode=ceil) == expected


@pytest.mark.parametrize("size,k,s,p,ceil", [(9, 3, 2, 0, True), (10, 3, 2, 1, False),
                                             (7, 2, 2, 1, True), (8, 3, 1, 1, True)])
def test_max_pool_matches_numpy(size, k, s, p, ceil):
  x = RNG.normal(size=(2, size, size + 1, 3)).astype(np.float32)
  got = layers.max_pool(jnp.asarray(x), k, s, padding=p, ceil_mode=ceil)
  np.testing.assert_allclose(got, _np_pool(x, k, s, p, ceil, "max"), rtol=0, atol=0)


@pytest.mark.parametrize("size,k,s,p,ceil", [(31, 2, 2, 0, False), (31, 2, 2, 0, True), (8, 2, 2, 0, False),
                                             (7, 3, 3, 1, True), (9, 3, 3, 0, False),  # blocks: window == stride
                                             (16, 3, 2, 1, False), (9, 3, 2, 0, True), (8, 3, 1, 1, True),
                                             (13, 3, 2, 0, False), (7, 5, 2, 2, False), (10, 2, 3, 0, True)])
def test_cpu_max_pool_values_and_gradient_match_reduce_window(size, k, s, p, ceil):
  """The CPU paths (blocks: reshape + max; overlapping windows: taps and stride phases)
  against numpy and XLA's reduce_window with its select-and-scatter gradient."""
  from jcv import kernels
  x = jnp.asarray(RNG.normal(size=(2, size, size + 1, 3)).astype(np.float32))  # no ties
  loss = lambda x: jnp.sum(jnp.sin(layers.max_pool(x, k, s, padding=p, ceil_mode=ceil)))
  with kernels.lowering("cpu"):
    got = layers.max_pool(x, k, s, padding=p, ceil_mode=ceil)
    grad = jax.grad(loss)(x)
    assert "select-and-scatter" not in jax.jit(jax.grad(loss)).lower(x).as_text(dialect="hlo")
  np.testing.assert_array_equal(got, _np_pool(np.asarray(x), k, s, p, ceil, "max"))
  with kernels.lowering("xla"):
    want = jax.grad(loss)(x)
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape,k,s,p", [((4, 8, 8, 3), 2, 2, 0), ((2, 9, 7, 5), 3, 3, 1), ((2, 16, 16, 8), 2, 2, 0),
                                         ((2, 16, 16, 8), 3, 2, 1), ((2, 9, 10, 5), 3, 2, 0), ((2, 8, 9, 4), 3, 1, 1)])
def test_cpu_max_pool_gradient_with_ties_goes_where_reduce_window_sends_it(shape, k, s, p, dtype):
  """Tied maxima (ReLU zeros, rounded values): the first in each window takes the whole
  gradient, bit for bit as XLA's select-and-scatter (a shared gradient would differ). The
  cotangents are small integers, so inputs in several windows sum their shares exactly."""
  from jcv import kernels
  x = jnp.maximum(jnp.round(jnp.asarray(RNG.normal(size=shape)) * 2), 0).astype(dtype)
  cot = jnp.round(4 * jnp.asarray(RNG.normal(size=layers.max_pool(x, k, s, padding=p).shape))).astype(dtype)
  loss = lambda x: jnp.sum((layers.max_pool(x, k, s, padding=p) * cot).astype(jnp.float32))
  with kernels.lowering("cpu"):
    grad = jax.grad(loss)(x)
  with kernels.lowering("xla"):
    want = jax.grad(loss)(x)
  assert float(jnp.mean(x == 0)) > 0.4  # windows of zeros: ties everywhere
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("include", [True, False])
def test_avg_pool_matches_numpy(include):
  x = RNG.normal(size=(2, 9, 8, 4)).astype(np.float32)
  got = layers.avg_pool(jnp.asarray(x), 3, 1, padding=1, count_include_pad=include)
  np.testing.assert_allclose(got, _np_pool(x, 3, 1, 1, False, "avg", include), rtol=1e-6, atol=1e-6)


def _np_adaptive(x, n, reduce):
  h, w = x.shape[1:3]
  out = np.zeros((x.shape[0], n, n, x.shape[3]), x.dtype)
  for i, j in itertools.product(range(n), range(n)):
    r0, r1 = (i * h) // n, -(-((i + 1) * h) // n)
    c0, c1 = (j * w) // n, -(-((j + 1) * w) // n)
    out[:, i, j] = reduce(x[:, r0:r1, c0:c1], axis=(1, 2))
  return out


@pytest.mark.parametrize("shape,n", [((2, 13, 13, 3), 6), ((1, 7, 7, 2), 7), ((1, 14, 14, 2), 7),
                                     ((1, 3, 5, 2), 6), ((1, 10, 10, 1), 4)])
def test_adaptive_pools_match_numpy(shape, n):
  x = RNG.normal(size=shape).astype(np.float32)
  np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), n), _np_adaptive(x, n, np.mean),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(layers.adaptive_max_pool(jnp.asarray(x), n), _np_adaptive(x, n, np.max))


@pytest.mark.parametrize("hw", [(13, 13), (4, 4), (3, 7), (21, 17)])
def test_spatial_pyramid_pool_matches_numpy(hw):
  x = RNG.normal(size=(2, *hw, 5)).astype(np.float32)
  got = layers.SpatialPyramidPool(levels=(6, 3, 2, 1)).apply({}, jnp.asarray(x))
  want = np.concatenate([_np_adaptive(x, n, np.max).reshape(2, -1) for n in (6, 3, 2, 1)], axis=1)
  assert got.shape == (2, 5 * 50)
  np.testing.assert_array_equal(got, want)


def test_local_response_norm_matches_formula():
  x = RNG.normal(size=(2, 4, 4, 11)).astype(np.float32) * 3
  got = layers.LocalResponseNorm(size=5, alpha=1e-2, beta=0.75, k=2.0).apply({}, jnp.asarray(x))
  sq = np.pad(x ** 2, ((0, 0), (0, 0), (0, 0), (2, 2)))
  window = sum(sq[..., i:i + 11] for i in range(5))
  np.testing.assert_allclose(got, x / (2.0 + 1e-2 / 5 * window) ** 0.75, rtol=1e-5, atol=1e-6)


def test_pooling_and_lrn_match_pytorch():
  torch = pytest.importorskip("torch")
  x = RNG.normal(size=(2, 11, 9, 6)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
  for k, s, p, ceil in [(3, 2, 0, True), (3, 2, 1, False), (2, 2, 1, True), (3, 1, 1, True)]:
    want = to_nhwc(torch.nn.functional.max_pool2d(xt, k, s, p, ceil_mode=ceil))
    np.testing.assert_array_equal(layers.max_pool(jnp.asarray(x), k, s, padding=p, ceil_mode=ceil), want)
  want = to_nhwc(torch.nn.functional.avg_pool2d(xt, 3, 1, 1, count_include_pad=True))
  np.testing.assert_allclose(layers.avg_pool(jnp.asarray(x), 3, 1, padding=1), want, rtol=1e-5, atol=1e-6)
  for n in (1, 3, 6, 7):
    want = to_nhwc(torch.nn.functional.adaptive_max_pool2d(xt, n))
    np.testing.assert_array_equal(layers.adaptive_max_pool(jnp.asarray(x), n), want)
    want = to_nhwc(torch.nn.functional.adaptive_avg_pool2d(xt, n))
    np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), n), want, rtol=1e-5, atol=1e-6)
  want = to_nhwc(torch.nn.LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=2.0)(xt))
  got = layers.LocalResponseNorm(alpha=1e-2).apply({}, jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_layer_errors():
  with pytest.raises(ValueError, match="'max' or 'avg'"):
    layers.SpatialPyramidPool(mode="min").apply({}, jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match="larger than input"):
    layers.pool_output_size(2, 3, 2)


@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
@pytest.mark.parametrize("distribution", ["normal", "truncated_normal", "uniform"])
def test_flat_variance_scaling_matches_flax_distribution(mode, distribution):
  import flax.linen as nn
  shape = (3, 3, 48, 96)
  ours = np.asarray(layers.variance_scaling(2.0, mode, distribution)(jax.random.key(0), shape))
  flax = np.asarray(nn.initializers.variance_scaling(2.0, mode, distribution)(jax.random.key(1), shape))
  assert ours.shape == shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours.std(), flax.std(), rtol=0.02)
  np.testing.assert_allclose(np.abs(ours).max(), np.abs(flax).max(), rtol=0.25)
  assert abs(ours.mean()) < 0.02 * ours.std()
