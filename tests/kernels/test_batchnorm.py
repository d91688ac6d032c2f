"""jcv.kernels.batchnorm: the training-mode BatchNorm (+ ReLU/ReLU6) with a hand-written gradient
equals Flax's ``nn.BatchNorm`` followed by the activation, differentiated by JAX.

Reference: ``flax.linen.BatchNorm`` (fast variance, float32 statistics) on the same inputs, its
gradients from ``jax.vjp``. Tolerances: float32 outputs and gradients within 2e-5 of their
scale (the sums are taken in another order; measured differences ~1e-7); bfloat16 outputs and
input gradients within 2**-6 of their scale (a few bfloat16 roundings). The native (C++)
reductions skip, with the reason, where jcv's native library cannot be built.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jcv import kernels
from jcv.kernels import batchnorm, native
from jcv.models.layers import ConvBNAct

native_only = pytest.mark.skipif(not native.available(),
                                 reason=f"jcv native library unavailable: {native.unavailable_reason()}")
BACKENDS = [False, pytest.param(True, marks=native_only)]
ACT_FNS = {None: lambda y: y, "relu": nn.relu, "relu6": nn.relu6}
SHAPES = [(4, 7, 5, 24), (1, 3, 5, 7), (33, 16)]


def _inputs(shape, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  c = shape[-1]
  x = rng.normal(size=shape) * rng.uniform(0.5, 3, c) + rng.normal(size=c) * 2 + 2  # relu6 clips some
  return (jnp.asarray(x, dtype), jnp.asarray(rng.normal(size=c) + 1, jnp.float32),
          jnp.asarray(rng.normal(size=c), jnp.float32))


def _flax(x, scale, bias, act, eps=1e-3):
  """nn.BatchNorm in training mode + act: (y, batch mean, batch var) as the module computes them."""
  c = x.shape[-1]
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": jnp.zeros(c), "var": jnp.ones(c)}}
  y, new = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=eps).apply(
      variables, x, mutable=["batch_stats"])
  return ACT_FNS[act](y), new["batch_stats"]["mean"], new["batch_stats"]["var"]


def _close(got, want, tol):
  scale = float(jnp.max(jnp.abs(want))) or 1.0
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol * scale, rtol=0)


@pytest.mark.parametrize("use_native", BACKENDS)
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_batch_norm_train_matches_flax_values_and_gradients(shape, act, use_native):
  x, scale, bias = _inputs(shape)
  fn = lambda x, s, b: batchnorm.batch_norm_train(x, s, b, 1e-3, act, use_native)  # noqa: E731
  got, vjp = jax.vjp(jax.jit(fn), x, scale, bias)
  want, vjp_ref = jax.vjp(lambda x, s, b: _flax(x, s, b, act), x, scale, bias)
  for g, w in zip(got, want):
    _close(g, w, 2e-5)
  rng = np.random.default_rng(1)
  cts = (jnp.asarray(rng.normal(size=shape), jnp.float32),  # and cotangents on mean and var too
         jnp.asarray(rng.normal(size=shape[-1]), jnp.float32), jnp.asarray(rng.normal(size=shape[-1]), jnp.float32))
  for g, w in zip(vjp(cts), vjp_ref(cts)):
    _close(g, w, 2e-5)


@pytest.mark.parametrize("use_native", BACKENDS)
def test_batch_norm_train_bfloat16_within_rounding(use_native):
  x, scale, bias = _inputs((4, 6, 6, 16), dtype=jnp.bfloat16)
  fn = lambda x: batchnorm.batch_norm_train(x, scale, bias, 1e-3, "relu6", use_native)[0]  # noqa: E731
  y, vjp = jax.vjp(fn, x)
  assert y.dtype == jnp.bfloat16
  want, vjp_ref = jax.vjp(lambda x: _flax(x, scale, bias, "relu6")[0], x.astype(jnp.float32))
  _close(y, want, 2 ** -6)
  ct = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)
  (dx,), (dx_ref,) = vjp(ct.astype(jnp.bfloat16)), vjp_ref(ct)
  assert dx.dtype == jnp.bfloat16
  _close(dx, dx_ref, 2 ** -6)


@native_only
def test_native_batch_norm_under_vmap_is_per_example_batch():
  xs = jnp.stack([_inputs((3, 4, 4, 8), seed=s)[0] for s in range(3)])
  _, scale, bias = _inputs((3, 4, 4, 8))
  f = lambda x: batchnorm.batch_norm_train(x, scale, bias, 1e-3, "relu", True)[0].sum() ** 2  # noqa: E731
  ref = lambda x: _flax(x, scale, bias, "relu")[0].sum() ** 2  # noqa: E731
  _close(jax.vmap(jax.grad(f))(xs), jax.vmap(jax.grad(ref))(xs), 2e-5)


@pytest.mark.parametrize("lowering", ["xla", "cpu", pytest.param("onednn", marks=native_only)])
def test_module_has_flax_variables_and_results(lowering):
  """Same variables as nn.BatchNorm, the same train/eval outputs and running averages."""
  x, _, _ = _inputs((4, 5, 5, 12))
  ours = batchnorm.BatchNorm(momentum=0.9, epsilon=1e-3, act="relu6", lowering=lowering)
  ref = nn.BatchNorm(momentum=0.9, epsilon=1e-3)
  variables = ref.init(jax.random.key(0), x, use_running_average=True)
  variables = jax.tree.map(lambda v: v + 0.1 * jnp.arange(v.size, dtype=v.dtype), variables)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x, use_running_average=True)) == \
      jax.tree.map(jnp.shape, variables)
  for train in (True, False):
    y, new = jax.jit(lambda v, x: ours.apply(v, x, use_running_average=not train, mutable=["batch_stats"]))(variables, x)
    y_ref, new_ref = ref.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])
    _close(y, nn.relu6(y_ref), 2e-5)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(new_ref)):
      _close(a, b, 2e-5)
  text = jax.jit(lambda v, x: ours.apply(v, x, use_running_average=False, mutable=["batch_stats"])).lower(
      variables, x).as_text()
  assert ("jcv_bn_stats" in text) == (lowering == "onednn")


@native_only
def test_native_batch_norm_data_parallel_over_two_devices():
  """Under a batch-sharded jit the statistics are over the global batch, without an all-gather."""
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  x, scale, bias = _inputs((4, 6, 6, 8))
  x = x.at[2:].multiply(3.0)  # the two halves differ

  def loss(params, x, use_native):
    y, mean, var = batchnorm.batch_norm_train(x, params[0], params[1], 1e-3, "relu6", use_native)
    return jnp.mean(y ** 2) + mean.sum() + var.sum()
  want = jax.value_and_grad(loss)((scale, bias), x, False)
  step = jax.jit(lambda p, x: jax.value_and_grad(loss)(p, x, True),
                 in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  assert "all-gather" not in step.lower((scale, bias), xs).compile().as_text()
  got = step((scale, bias), xs)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    _close(g, w, 2e-5)


def test_conv_bn_act_fuses_relu6_and_keeps_other_activations():
  x = _inputs((2, 6, 6, 4))[0]
  for act in (nn.relu6, nn.gelu):
    block = ConvBNAct(8, 3, act=act)
    with kernels.lowering("cpu"):
      v = block.init(jax.random.key(0), x)
      y, _ = block.apply(v, x, train=True, mutable=["batch_stats"])
    conv = jax.lax.conv_general_dilated(x, v["params"]["conv"]["kernel"], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = act(_flax(conv, v["params"]["bn"]["scale"], v["params"]["bn"]["bias"], None, eps=1e-5)[0])
    _close(y, want, 2e-5)
  with pytest.raises(ValueError, match="act must be one of"):
    batchnorm.BatchNorm(act="gelu").init(jax.random.key(0), x)
