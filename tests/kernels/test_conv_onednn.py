"""The oneDNN conv lowering (jcv.kernels.onednn through XLA's FFI) equals lax.conv_general_dilated.

Reference: ``jax.lax.conv_general_dilated`` (XLA's convolution) on the same float32 inputs.
Tolerances: float32 forward, input gradient and kernel gradient within 1e-5 absolute and
relative (values of order 1; oneDNN sums in another order, measured differences ~1e-6);
bfloat16 within 2**-6 of the output's scale (a few bfloat16 roundings). The native tests skip,
with the reason, where the library cannot be built (no compiler, no oneDNN, not Linux x86-64);
the fallback test runs everywhere.
"""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jcv import kernels
from jcv.kernels import geometry, native, onednn

from conv_reference import DIMS, _inputs, _pair, _reference  # noqa: E402  (tests/kernels)
native_only = pytest.mark.skipif(not native.available(),
                                 reason=f"oneDNN native convolutions unavailable: {native.unavailable_reason()}")

# (N, H, W, Cin, Cout, kh, kw, strides, padding, groups, dilation). groups == Cin is depthwise.
CASES = [
    (2, 9, 9, 8, 16, 3, 3, 1, "SAME", 1, 1),
    (2, 9, 9, 8, 16, 3, 3, 2, "SAME", 1, 1),
    (2, 8, 8, 8, 16, 3, 3, 2, "SAME", 1, 1),
    (1, 7, 8, 6, 5, 3, 3, 2, "VALID", 1, 1),
    (2, 11, 9, 6, 9, 5, 3, 1, [(2, 1), (0, 3)], 1, 1),
    (2, 10, 9, 6, 4, 3, 3, 1, "SAME", 1, 2),
    (2, 9, 8, 3, 5, 7, 7, 2, 3, 1, 1),             # a stem
    (1, 15, 13, 3, 8, 3, 3, 2, "SAME", 1, 1),      # odd sizes, batch 1
    (2, 7, 8, 4, 4, 3, 3, 1, "SAME", 4, 1),        # depthwise
    (2, 7, 7, 8, 8, 3, 3, 2, "SAME", 8, 1),
    (2, 8, 8, 3, 6, 3, 3, 2, "SAME", 3, 1),        # depthwise, channel multiplier 2
    (2, 9, 9, 4, 4, 3, 3, 1, "SAME", 4, 2),        # depthwise, dilated
    (2, 6, 6, 4, 6, 3, 3, 1, "SAME", 2, 1),        # grouped
    (2, 2, 2, 16, 8, 3, 3, 1, "SAME", 1, 1),       # tiny map
    (2, 7, 8, 4, 6, 1, 1, 2, "SAME", 1, 1),        # 1x1
    (2, 9, 9, 32, 32, 5, 5, 1, "SAME", 32, 1),     # depthwise 5x5 (EfficientNet)
    (2, 10, 10, 32, 32, 5, 5, 2, "SAME", 32, 1),   # depthwise 5x5, strided
]
IDS = ["-".join(map(str, c)).replace(" ", "") for c in CASES]


def _onednn_raw(strides, padding, groups, dilation):
  """oneDNN for every layer (the lowering keeps some rewrites; the kernel itself is tested here)."""
  def conv(x, k):
    s, d = _pair(strides), _pair(dilation)
    pads = geometry.explicit_pads(x.shape[1:3], k.shape[:2], s, d,
                                  kernels.normalize_padding(padding, k.shape[:2]))
    return onednn.conv(x, k, s, pads, d, groups)
  return conv


def _value_and_grads(fn, x, k, seed=1):
  y, vjp = jax.vjp(fn, x, k)
  ct = jnp.asarray(np.random.default_rng(seed).normal(size=y.shape), y.dtype)
  return (y, *vjp(ct))


@native_only
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("raw", [True, False], ids=["kernel", "lowering"])
def test_onednn_matches_lax_forward_and_gradients(case, raw):
  *_, strides, padding, groups, dilation = case
  x, k = _inputs(case)
  fn = (_onednn_raw(strides, padding, groups, dilation) if raw else
        lambda a, b: kernels.conv2d(a, b, strides=strides, padding=padding, groups=groups,
                                    dilation=dilation, lowering="onednn"))
  ours = jax.jit(lambda x, k: _value_and_grads(fn, x, k))(x, k)
  ref = _value_and_grads(lambda a, b: _reference(a, b, strides, padding, groups, dilation), x, k)
  for name, a, b in zip(["output", "d_input", "d_kernel"], ours, ref):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5, err_msg=name)


@native_only
@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[6], CASES[8], CASES[9], CASES[10], CASES[15], CASES[16]],
                         ids=["3x3", "3x3-s2", "stem", "depthwise", "depthwise-s2", "depthwise-mult", "depthwise-5x5",
                              "depthwise-5x5-s2"])
def test_onednn_bfloat16_within_bfloat16_rounding(case):
  """bfloat16 forward and both gradients, with whichever implementation measured fastest here."""
  check_bfloat16(case)


def check_bfloat16(case):
  *_, strides, padding, groups, dilation = case
  x, k = _inputs(case, jnp.bfloat16)
  ours = jax.jit(lambda x, k: _value_and_grads(_onednn_raw(strides, padding, groups, dilation), x, k))(x, k)
  ref = _value_and_grads(lambda a, b: _reference(a, b, strides, padding, groups, dilation),
                         x.astype(jnp.float32), k.astype(jnp.float32))
  for name, a, b in zip(["output", "d_input", "d_kernel"], ours, ref):
    assert a.dtype == jnp.bfloat16, name
    b = np.asarray(b)
    np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2 ** -6 * np.abs(b).max(), err_msg=name)


@native_only
@pytest.mark.parametrize("impl", ["first", "noamx", "upcast", "direct"])
def test_every_forced_implementation_matches_the_reference(impl):
  """``JCV_ONEDNN_IMPL`` forces each candidate of the measured choice (oneDNN's first kernel, its
  first without AMX, float32 inside the call, jcv's direct depthwise kernel gradient) where it
  applies: float32 and bfloat16 depthwise cases (strided, dilated, 5x5) and a dense one."""
  code = textwrap.dedent(f"""
      import test_conv_onednn as t
      for i in (0, 8, 9, 11, 15, 16):
        t.test_onednn_matches_lax_forward_and_gradients(t.CASES[i], raw=True)
        t.check_bfloat16(t.CASES[i])
      print("CHECKED")
  """)
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, JCV_ONEDNN_IMPL=impl, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env["PYTHONPATH"] = os.pathsep.join([here, os.path.dirname(os.path.dirname(here)), env.get("PYTHONPATH", "")])
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "CHECKED" in proc.stdout, proc.stderr[-3000:]


@native_only
def test_onednn_under_vmap_and_grad():
  case = CASES[1]
  *_, strides, padding, groups, dilation = case
  x, k = _inputs(case)
  xs, ks = jnp.stack([x, 2 * x, -x]), jnp.stack([k, 0.5 * k, k])
  conv = _onednn_raw(strides, padding, groups, dilation)
  ref = lambda a, b: _reference(a, b, strides, padding, groups, dilation)  # noqa: E731
  # kernel shared (images folded into the batch) and per-example kernels (one conv each)
  for axes, args in (((0, None), (xs, k)), ((0, 0), (xs, ks)), ((None, 0), (x, ks))):
    np.testing.assert_allclose(jax.jit(jax.vmap(conv, axes))(*args), jax.vmap(ref, axes)(*args),
                               atol=1e-5, rtol=1e-5)
  # per-example gradients: vmap of grad, and grad of a vmapped loss
  loss = lambda f: lambda a, b: jnp.sum(f(a, b) ** 2)  # noqa: E731
  ours = jax.jit(jax.vmap(jax.grad(loss(conv), (0, 1)), (0, None)))(xs, k)
  want = jax.vmap(jax.grad(loss(ref), (0, 1)), (0, None))(xs, k)
  for a, b in zip(ours, want):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)
  vloss = lambda f: lambda a, b: jnp.sum(jax.vmap(f, (0, None))(a, b) ** 2)  # noqa: E731
  for a, b in zip(jax.grad(vloss(conv), (0, 1))(xs, k), jax.grad(vloss(ref), (0, 1))(xs, k)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


@native_only
@pytest.mark.parametrize("mode", ["jit", "shard_map"])
def test_onednn_data_parallel_step_over_two_devices(mode):
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
  mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
  case = CASES[0]
  x, k = _inputs(case)
  x = jnp.concatenate([x, -x])  # 4 images, 2 per device

  def loss(k, x, conv):
    return jnp.mean(conv(x, k) ** 2)
  conv = lambda x, k: kernels.conv2d(x, k, lowering="onednn")  # noqa: E731
  ref_conv = lambda x, k: _reference(x, k, 1, "SAME", 1, 1)  # noqa: E731
  want_loss, want = jax.value_and_grad(loss)(k, x, ref_conv)
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  if mode == "jit":
    step = jax.jit(lambda k, x: jax.value_and_grad(loss)(k, x, conv),
                   in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))))
  else:  # as jcv.train.parallel's "pmap" mode: per-device grads, then pmean
    def per_device(k, x):
      value, grad = jax.value_and_grad(loss)(k, x, conv)
      return jax.lax.pmean(value, "data"), jax.lax.pmean(grad, "data")
    step = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")),
                                 out_specs=(P(), P()), check_vma=False))
  if mode == "jit":  # partitioned over the batch: no device gathers the whole batch
    assert "all-gather" not in step.lower(k, xs).compile().as_text()
  value, grad = step(k, xs)
  np.testing.assert_allclose(value, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, want, atol=1e-6, rtol=1e-5)


@native_only
def test_onednn_lowering_is_explicit_and_retraced():
  x, k = _inputs(CASES[0])
  calls = []

  @jax.jit
  def f(x, k):
    calls.append(1)
    return kernels.conv2d(x, k)
  text = {}
  for name in ("onednn", "xla"):
    with kernels.lowering(name):
      text[name] = f.lower(x, k).as_text()
      f(x, k)
  assert "jcv_onednn_conv_fwd" in text["onednn"] and "jcv_onednn_conv_fwd" not in text["xla"]
  assert len(calls) >= 2  # the second lowering retraced instead of reusing the cached trace
  assert "jcv_onednn" in jax.jit(kernels.make_conv("onednn")).lower(x, k).as_text()
  assert "jcv_onednn" not in jax.jit(kernels.make_conv("cpu")).lower(x, k).as_text()
  assert kernels.resolve("auto") == ("onednn" if jax.default_backend() == "cpu" else "xla")


def test_fallback_without_native_library_warns_once_and_stays_exact(tmp_path):
  """No compiler: one single-line warning, and the "onednn"/"auto" lowerings compute on XLA."""
  code = textwrap.dedent("""
      import warnings
      warnings.simplefilter("always")
      import jax, jax.numpy as jnp, numpy as np
      from jax import lax
      from jcv import kernels
      from jcv.kernels import native
      x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 9, 9, 8)), jnp.float32)
      k = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 8, 4)), jnp.float32)
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [jax.jit(lambda a, b: kernels.conv2d(a, b, lowering=name))(x, k) for name in ("onednn", "auto", "onednn")]
        g = jax.grad(lambda b: kernels.conv2d(x, b, lowering="onednn").sum())(k)
      ref = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      gref = jax.grad(lambda b: lax.conv_general_dilated(x, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")).sum())(k)
      assert not native.available()
      for y in ys:
        np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(g, gref, atol=1e-4, rtol=1e-5)
      msgs = [str(w.message) for w in caught if "oneDNN" in str(w.message)]
      print("WARNINGS", len(msgs), repr(msgs[0]) if msgs else "")
  """)
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), JCV_CACHE_DIR=str(tmp_path / "cache"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("WARNINGS")][0]
  assert line.startswith("WARNINGS 1 "), line
  assert "\\n" not in line and "unavailable" in line
