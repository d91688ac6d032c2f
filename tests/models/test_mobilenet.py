"""MobileNetV1/V2: Keras parameter counts, shapes, the inverted-residual block, frozen BN."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jcv.models import mobilenet


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _shapes(model, size=224):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))


@pytest.mark.parametrize("factory, trainable, total", [
    (mobilenet.mobilenet_v2, 3_504_872, 3_538_984),  # keras.applications.MobileNetV2().summary()
    (mobilenet.mobilenet_v1, 4_231_976, 4_253_864),  # keras.applications.MobileNet().summary()
])
def test_keras_parameter_counts(factory, trainable, total):
  variables = _shapes(factory(num_classes=1000))
  assert _count(variables["params"]) == trainable
  assert _count(variables) == total


def test_backbone_size_matches_shared_weights():
  # ../shared/weights/README.md: 2,257,984 numbers in the 260 backbone arrays.
  variables = _shapes(mobilenet.mobilenet_v2(num_classes=0))
  assert _count(variables) == 2_257_984
  assert len(jax.tree.leaves(variables)) == 260


@pytest.mark.parametrize("width, stem, last", [(0.35, 16, 1280), (0.5, 16, 1280), (1.4, 48, 1792)])
def test_width_multiplier(width, stem, last):
  variables = _shapes(mobilenet.mobilenet_v2(num_classes=0, width=width), 96)
  assert variables["params"]["stem"]["conv"]["kernel"].shape == (3, 3, 3, stem)
  assert variables["params"]["last_conv"]["conv"]["kernel"].shape[-1] == last


def test_make_divisible_matches_keras():
  assert [mobilenet.make_divisible(c * 0.35) for c in (32, 16, 24, 96, 320)] == [16, 8, 8, 32, 112]


def test_output_shapes_and_stages():
  model = mobilenet.mobilenet_v2(num_classes=7, width=0.35)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, 160, 160, 3))))[0]
  assert out.shape == (2, 7)
  features = mobilenet.mobilenet_v2(num_classes=0)
  out = jax.eval_shape(lambda: features.init_with_output(jax.random.key(0), jnp.zeros((2, 128, 128, 3))))[0]
  assert out.shape == (2, 1280)
  names = features.stage_names()
  assert names[0] == "stem" and names[-1] == "last_conv" and len(names) == 19
  assert list(_shapes(features, 64)["params"]) == sorted(names)


def test_inverted_residual_adds_input_only_when_shapes_match():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
  block = mobilenet.InvertedResidual(16, expansion=6)
  variables = jax.jit(block.init)(jax.random.key(0), x)
  zero = jax.tree.map(jnp.zeros_like, variables["params"])  # kills the residual branch
  np.testing.assert_allclose(jax.jit(block.apply)({**variables, "params": zero}, x), x, atol=1e-6)
  strided = mobilenet.InvertedResidual(24, strides=2)
  assert jax.eval_shape(strided.init_with_output, jax.random.key(0), x)[0].shape == (2, 4, 4, 24)
  unexpanded = jax.eval_shape(mobilenet.InvertedResidual(16, expansion=1).init, jax.random.key(0), x)
  assert "expand" not in unexpanded["params"]


def _run(model, variables, x):
  return jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)


def _random_variables(model, x):
  """Random parameters and BN statistics without compiling the model's init."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape, np.float32), shapes)
  variables["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5, variables["batch_stats"])
  return variables


def test_frozen_bn_stages_run_in_inference_mode():
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, 3))
  free = mobilenet.mobilenet_v2(num_classes=3, width=0.35)
  variables = _random_variables(free, x)
  eval_out = jax.jit(free.apply)(variables, x)
  frozen = mobilenet.mobilenet_v2(num_classes=3, width=0.35, frozen_bn_stages=19)
  out, updates = _run(frozen, variables, x)
  np.testing.assert_allclose(out, eval_out, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])
  partly = mobilenet.mobilenet_v2(num_classes=3, width=0.35, frozen_bn_stages=5)
  out, updates = _run(partly, variables, x)
  assert not np.allclose(out, eval_out, atol=1e-3)  # the unfrozen stages use batch statistics
  stats, old = updates["batch_stats"], variables["batch_stats"]
  np.testing.assert_array_equal(stats["block_3"]["project"]["bn"]["mean"], old["block_3"]["project"]["bn"]["mean"])
  assert not np.allclose(stats["block_4"]["project"]["bn"]["mean"], old["block_4"]["project"]["bn"]["mean"])


def test_bad_width():
  with pytest.raises(ValueError, match="width multiplier"):
    mobilenet.mobilenet_v2(width=0)
