"""jcv.kernels.fused: the inference form (BatchNorm folded into the convolution, bias, residual
and activation as oneDNN post-ops) equals the unfolded layers.

References: XLA's convolution followed by the same jnp ops (single layers, values and gradients,
1e-5 of their scale), and each model family's own unfolded inference-mode logits (1e-4 relative,
float32) with random BatchNorm statistics and affine parameters, so that folding changes every
weight. The oneDNN path is also checked to be the one taken (its FFI target in the lowered
module); where jcv's native library cannot be built the folded jnp form is tested alone.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcv.models
from jcv import kernels
from jcv.kernels import native
from jcv.train import step

native_only = pytest.mark.skipif(not native.available(),
                                 reason=f"jcv native library unavailable: {native.unavailable_reason()}")
ACTS = {None: None, "relu": nn.relu, "relu6": nn.relu6, "gelu": nn.gelu}


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@native_only
@pytest.mark.parametrize("groups,k,strides,act,residual", [
    (1, 3, 1, "relu", False), (1, 3, 2, "relu6", False), (1, 1, 1, None, True), (16, 3, 1, "relu6", False),
    (16, 3, 2, "relu", False), (1, 3, 1, "relu", True), (1, 3, 1, "gelu", True)])
def test_onednn_layer_equals_xla(groups, k, strides, act, residual):
  rng = np.random.default_rng(groups * 10 + k)
  x = jnp.asarray(rng.normal(size=(3, 12, 11, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, 16 // groups, 16)) * 0.3, jnp.float32)
  b = jnp.asarray(rng.normal(size=16) * 2, jnp.float32)  # relu6 clips some outputs at 0 and 6
  r = jnp.asarray(rng.normal(size=(3, -(-12 // strides), -(-11 // strides), 16)), jnp.float32) if residual else None

  def layer(lowering):
    return jax.jit(lambda x, w, b, r: kernels.conv2d_bias_act(x, w, b, act=ACTS[act], residual=r, strides=strides,
                                                              groups=groups, lowering=lowering))
  assert "jcv_onednn_conv_fused" in layer("onednn").lower(x, w, b, r).as_text()
  assert _rel(layer("onednn")(x, w, b, r), layer("xla")(x, w, b, r)) < 1e-5
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  argnums = (0, 1, 2, 3) if residual else (0, 1, 2)
  got = jax.grad(loss(layer("onednn")), argnums)(x, w, b, r)
  want = jax.grad(loss(layer("xla")), argnums)(x, w, b, r)
  for g, h in zip(got, want):
    assert _rel(g, h) < 1e-5


def _randomized(variables, seed=0):
  """BatchNorm statistics and affine parameters drawn at random (folding then changes every weight)."""
  rng = np.random.default_rng(seed)

  def draw(path, v):
    name = path[-1].key
    if name == "mean":
      return jnp.asarray(rng.normal(size=v.shape) * 0.2, v.dtype)
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 2.0, v.shape), v.dtype)
    if name in ("scale", "bias") and v.ndim == 1:
      return jnp.asarray(rng.uniform(0.5, 1.5, v.shape) if name == "scale" else rng.normal(size=v.shape) * 0.1, v.dtype)
    return v
  return jax.tree_util.tree_map_with_path(draw, variables)


FAMILIES = [("resnet18", 32, {}), ("resnet50", 32, {}), ("resnet20", 32, {}), ("mobilenet_v1", 32, {}),
            ("mobilenet_v2", 32, {}), ("efficientnet_lite0", 32, {}), ("vgg11_bn", 32, {}), ("googlenet", 32, {}),
            ("inception_v3", 75, {}), ("inception_resnet_v2", 75, {}), ("textbook_cnn", 32, {"batch_norm": True}),
            ("advanced_cnn", 32, {}), ("cifar_cnn", 32, {})]


@pytest.mark.parametrize("name,size,options", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_folded_model_equals_unfolded(name, size, options):
  model = jcv.models.create(name, num_classes=10, **options)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)), jnp.float32)
  variables = _randomized(model.init({"params": jax.random.key(0)}, x, train=False))
  plain = jax.jit(lambda v, x: model.apply(v, x, train=False))

  def folded(v, x):
    with kernels.fused_inference():
      return model.apply(v, x, train=False)
  folded = jax.jit(folded)
  if native.available() and kernels.resolved_lowering() == "onednn":
    assert "jcv_onednn_conv_fused" in folded.lower(variables, x).as_text()
  assert _rel(folded(variables, x), plain(variables, x)) < 1e-4


def test_predict_logits_runs_the_folded_form():
  """jcv's inference entry point (evaluation in fit, jcv evaluate/predict) traces the folded model."""
  from types import SimpleNamespace
  model = jcv.models.create("resnet20", num_classes=10)
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3)), jnp.uint8)
  variables = _randomized(model.init({"params": jax.random.key(0)}, images.astype(jnp.float32), train=False))
  state = SimpleNamespace(variables=variables, apply_fn=model.apply)
  logits = jax.jit(lambda images: step.predict_logits(state, images))
  want = model.apply(variables, images.astype(jnp.float32) / 255.0, train=False)
  assert _rel(logits(images), want) < 1e-4
  if native.available() and kernels.resolved_lowering() == "onednn":
    assert "jcv_onednn_conv_fused" in logits.lower(images).as_text()


@pytest.mark.parametrize("mode", ["jit", "pmap"])
def test_folded_evaluation_data_parallel(mode):
  """fit's evaluation over two devices (sharded jit, or shard_map) runs the folded form per shard
  and sums to the one-device metrics."""
  import optax
  from jcv.train import parallel
  from jcv.train.state import create_train_state
  model = jcv.models.create("resnet20", num_classes=10)
  rng = np.random.default_rng(3)
  batch = {"image": rng.integers(0, 256, (8, 32, 32, 3)).astype(np.uint8), "label": rng.integers(0, 10, 8)}
  state = create_train_state(jax.random.key(0), model, optax.sgd(0.1), (1, 32, 32, 3))
  variables = _randomized(state.variables)
  state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
  sums = {}
  for devices in (1, 2):
    mesh = parallel.make_mesh(jax.devices()[:devices])
    fn = parallel.compile_eval_step(step.eval_step, mesh, mode=mode)
    sums[devices] = parallel.fetch(fn(parallel.replicate(state, mesh), parallel.shard_batch(batch, mesh)))
  for k in ("loss", "top1", "count"):
    assert float(sums[2][k]) == pytest.approx(float(sums[1][k]), rel=1e-5)


def test_training_step_folds_frozen_batchnorm():
  """A fine-tuning step with every BatchNorm frozen (EfficientNet-Lite's ``frozen_bn_stages``)
  folds those layers into their convolutions (the fused oneDNN call) and updates the parameters
  (kernels, BatchNorm scale and bias) as plain SGD on the unfolded model's gradients (to 1e-4 of
  the largest update)."""
  import functools
  import optax
  from jcv.train import losses
  from jcv.train.state import create_train_state
  model = jcv.models.create("efficientnet_lite0", num_classes=5, frozen_bn_stages=99, dropout_rate=0.0,
                            drop_connect_rate=0.0)
  state = create_train_state(jax.random.key(0), model, optax.sgd(0.1), (1, 32, 32, 3))
  state = state.replace(batch_stats=_randomized({"batch_stats": state.batch_stats})["batch_stats"])
  rng = np.random.default_rng(4)
  batch = {"image": jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3)), jnp.uint8),
           "label": jnp.asarray(rng.integers(0, 5, 4), jnp.int32)}
  train = jax.jit(functools.partial(step.train_step, num_classes=5))
  new, metrics = train(state, batch)

  def loss(params):  # the model as written, outside fused_inference
    logits = model.apply({"params": params, "batch_stats": state.batch_stats}, batch["image"] / 255.0, train=True)
    return jnp.mean(losses.cross_entropy(logits, jax.nn.one_hot(batch["label"], 5)))
  want_loss, grads = jax.jit(jax.value_and_grad(loss))(state.params)
  assert abs(float(metrics["loss"]) - float(want_loss)) < 1e-4
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) * 0.1  # the largest update
  for a, g, p in zip(jax.tree.leaves(new.params), jax.tree.leaves(grads), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a - p, -0.1 * g, rtol=1e-3, atol=1e-4 * scale)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, new.batch_stats, state.batch_stats))
  if native.available() and kernels.resolved_lowering() == "onednn":
    assert "jcv_onednn_conv_fused" in train.lower(state, batch).as_text()
