"""jcv.kernels.conv2d: every lowering equals lax.conv_general_dilated, forward and backward.

Reference: ``jax.lax.conv_general_dilated`` (XLA's convolution) on the same inputs.
Tolerance: 1e-5 (absolute, on values of order 1) in float32; bfloat16 results must be within
bfloat16 rounding (2 ulp relative to the output scale) of the float32 reference.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jcv import kernels

from conv_reference import DIMS, _inputs, _pair, _reference  # noqa: E402  (tests/kernels)

# (N, H, W, Cin, Cout, kh, kw, strides, padding, groups, dilation). groups == Cin is depthwise.
CASES = [
    # 1x1 (matmul path)
    (2, 7, 8, 4, 6, 1, 1, 1, "SAME", 1, 1),
    (2, 7, 8, 4, 6, 1, 1, 2, "SAME", 1, 1),
    (2, 8, 8, 4, 6, 1, 1, 2, "VALID", 1, 1),
    (2, 7, 7, 4, 6, 1, 1, (2, 1), [(1, 0), (0, 2)], 1, 1),
    # depthwise (shifted multiply-add path), with and without channel multiplier
    (2, 7, 8, 4, 4, 3, 3, 1, "SAME", 4, 1),
    (2, 8, 8, 4, 4, 3, 3, 2, "SAME", 4, 1),
    (2, 7, 7, 4, 4, 3, 3, 2, "SAME", 4, 1),
    (2, 9, 8, 4, 4, 5, 5, 2, "VALID", 4, 1),
    (2, 8, 9, 4, 4, 3, 3, 1, [(1, 1), (2, 0)], 4, 1),
    (2, 9, 9, 4, 4, 3, 3, 1, "SAME", 4, 2),
    (2, 8, 8, 3, 6, 3, 3, 2, "SAME", 3, 1),
    (1, 6, 7, 2, 4, 3, 2, (1, 2), "VALID", 2, (2, 1)),
    # first layers, <= 4 input channels (im2col kernel-gradient path)
    (2, 7, 8, 4, 6, 3, 3, 1, "SAME", 1, 1),
    (2, 8, 8, 4, 6, 3, 3, 2, "SAME", 1, 1),
    (2, 9, 9, 3, 5, 7, 7, 2, 3, 1, 1),
    (2, 8, 7, 4, 6, 3, 3, 1, "VALID", 1, 2),
    # first layers with tiny kernels, kh*kw*cin <= 16 (im2col + matmul path): airbench's
    # 2x2 whitening layer on RGB, a 2x2 on 4 channels
    (2, 8, 8, 3, 6, 2, 2, 2, "VALID", 1, 1),
    (2, 9, 8, 3, 24, 2, 2, 1, "VALID", 1, 1),
    (2, 7, 7, 4, 5, 2, 2, 1, "SAME", 1, 1),
    # maps with fewer pixels than kernel taps (unrolled-kernel matmul path): a 3x3 SAME conv on
    # 2x2 and 1x1 maps, stride 2, a 5x5 kernel, dilation, pads that leave outputs all padding
    (2, 2, 2, 8, 6, 3, 3, 1, "SAME", 1, 1),
    (2, 1, 1, 8, 6, 3, 3, 1, "SAME", 1, 1),
    (2, 2, 2, 8, 6, 3, 3, 2, "SAME", 1, 1),
    (1, 3, 2, 5, 7, 3, 3, 1, [(0, 0), (1, 1)], 1, 1),
    (2, 4, 4, 3, 4, 5, 5, (2, 1), "SAME", 1, 1),
    (2, 2, 3, 4, 6, 3, 3, 1, "SAME", 1, (2, 1)),
    (1, 2, 2, 4, 6, 3, 3, 1, [(4, 0), (1, 3)], 1, 1),
    (1, 1, 1, 3, 4, 2, 2, 3, [(2, 2), (2, 2)], 1, 1),  # no output sees the pixel
    # tiny outputs (im2col + matmul path)
    (2, 3, 4, 8, 6, 3, 3, 2, [(1, 0), (2, 1)], 1, (1, 2)),
    (1, 4, 4, 256, 8, 3, 3, 1, "SAME", 1, 1),
    (1, 7, 7, 512, 4, 3, 3, 1, "SAME", 1, 1),
    # XLA path (more channels, larger maps)
    (2, 9, 9, 8, 6, 3, 3, 1, "SAME", 1, 1),
    # grouped (falls back to XLA)
    (2, 6, 6, 4, 6, 3, 3, 1, "SAME", 2, 1),
]


def _value_and_grads(fn, x, k, seed=1):
  y, vjp = jax.vjp(fn, x, k)
  ct = jnp.asarray(np.random.default_rng(seed).normal(size=y.shape), y.dtype)
  return (y, *vjp(ct))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_cpu_lowering_matches_lax_forward_and_gradients(case):
  *_, strides, padding, groups, dilation = case
  x, k = _inputs(case)
  with kernels.lowering("cpu"):
    ours = jax.jit(lambda x, k: _value_and_grads(
        lambda a, b: kernels.conv2d(a, b, strides=strides, padding=padding, groups=groups,
                                     dilation=dilation), x, k))(x, k)
  ref = _value_and_grads(lambda a, b: _reference(a, b, strides, padding, groups, dilation), x, k)
  for name, a, b in zip(["output", "d_input", "d_kernel"], ours, ref):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[10], CASES[13], CASES[17], CASES[19], CASES[27]],
                         ids=["1x1", "depthwise", "depthwise-mult", "first-layer", "whitening", "small-map",
                              "tiny-map"])
def test_bfloat16_matches_float32_reference(case):
  *_, strides, padding, groups, dilation = case
  x, k = _inputs(case, jnp.bfloat16)
  with kernels.lowering("cpu"):
    ours = jax.jit(lambda x, k: _value_and_grads(
        lambda a, b: kernels.conv2d(a, b, strides=strides, padding=padding, groups=groups,
                                     dilation=dilation), x, k))(x, k)
  ref = _value_and_grads(lambda a, b: _reference(a, b, strides, padding, groups, dilation),
                         x.astype(jnp.float32), k.astype(jnp.float32))
  for name, a, b in zip(["output", "d_input", "d_kernel"], ours, ref):
    assert a.dtype == jnp.bfloat16, name
    b = np.asarray(b)
    # bfloat16 has 8 significant bits: allow a few roundings at the output's scale.
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2 ** -6 * np.abs(b).max(),
                               err_msg=name)


def _primitives(fn, *args):
  return {eqn.primitive.name for eqn in jax.make_jaxpr(fn)(*args).eqns}


def test_cpu_lowering_avoids_xla_conv_for_1x1_depthwise_and_tiny_maps():
  x = jnp.zeros((1, 8, 8, 4))
  with kernels.lowering("cpu"):
    one = _primitives(lambda a, b: kernels.conv2d(a, b, strides=2), x, jnp.zeros((1, 1, 4, 8)))
    dw = jax.make_jaxpr(jax.grad(lambda a, b: kernels.conv2d(a, b, groups=4).sum(), (0, 1)))(
        x, jnp.zeros((3, 3, 1, 4)))
    tiny = str(jax.make_jaxpr(jax.grad(lambda a, b: kernels.conv2d(a, b).sum(), (0, 1)))(
        jnp.zeros((1, 2, 2, 8)), jnp.zeros((3, 3, 8, 8))))
    whiten = _primitives(lambda a, b: kernels.conv2d(a, b, padding="VALID"),
                         jnp.zeros((1, 8, 8, 3)), jnp.zeros((2, 2, 3, 24)))
  assert "conv_general_dilated" not in whiten and "dot_general" in whiten
  assert "conv_general_dilated" not in one and "dot_general" in one
  assert "conv_general_dilated" not in tiny and "dot_general" in tiny
  assert "conv_general_dilated" not in str(dw)
  with kernels.lowering("xla"):
    assert "conv_general_dilated" in _primitives(
        lambda a, b: kernels.conv2d(a, b, groups=4), x, jnp.zeros((3, 3, 1, 4)))


def test_auto_lowering_follows_backend():
  from jcv.kernels import native
  with kernels.lowering("auto"):
    cpu = "onednn" if native.available() else "cpu"
    expected = cpu if jax.default_backend() == "cpu" else "xla"
    assert kernels.resolved_lowering() == expected
    assert kernels.resolve("xla") == "xla"


def test_bad_arguments_raise_clear_errors():
  x = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError, match="padding must be"):
    kernels.conv2d(x, jnp.zeros((3, 3, 4, 4)), padding="FULL")
  with pytest.raises(ValueError, match="groups"):
    kernels.conv2d(x, jnp.zeros((3, 3, 4, 4)), groups=3)
  with pytest.raises(ValueError, match="NHWC"):
    kernels.conv2d(jnp.zeros((8, 8, 4)), jnp.zeros((3, 3, 4, 4)))
  with pytest.raises(ValueError, match="lowering must be one of"):
    kernels.set_lowering("fast")
