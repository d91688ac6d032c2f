"""The model zoo: exact parameter counts, output shapes, options, errors (no big compilation).

Parameter counts are compared with the published reference numbers (torchvision / Keras
applications, the table of issue 4), computed with ``jax.eval_shape`` only.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jcv.models as M

# Trainable parameters at num_classes=1000 (10 for the CIFAR ResNets), from the references.
REFERENCE_PARAMS = {
    "alexnet": 61_100_840,             # torchvision
    "vgg11": 132_863_336,              # torchvision
    "vgg16": 138_357_544,              # torchvision
    "vgg19": 143_667_240,              # torchvision
    "vgg16_bn": 138_365_992,           # torchvision
    "vgg11_bn": 132_868_840,           # torchvision
    "googlenet": 6_624_904,            # torchvision, aux_logits=False
    "inception_v3": 23_834_568,        # torchvision, aux_logits=False
    "resnet18": 11_689_512,            # torchvision
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
    "inception_resnet_v2": 55_813_192,  # Keras: 55,873,736 total - 60,544 BN moving stats
    "mobilenet_v1": 4_231_976,         # Keras (trainable)
    "mobilenet_v2": 3_504_872,         # Keras
    "efficientnet_lite0": 4_652_008,   # PyTorch state dicts of the TF checkpoints
    "efficientnet_lite1": 5_416_680,
    "efficientnet_lite2": 6_092_072,   # = ../shared/weights/efficientnet_lite2.npz
}
# Our own designs / no published exact count: the counts we derive by hand in the cards.
DERIVED_PARAMS = {"zfnet": 62_357_608, "spp_net": 77_037_672, "resnet20": 269_722,
                  "resnet56": 853_018, "textbook_cnn": 1_341_226,
                  "efficientnet_lite3": 8_197_096,    # published rounded: 8.197M
                  "efficientnet_lite4": 13_006_568}   # published rounded: 13.007M
# (pooled feature width, a small input size that the model accepts)
FEATURES = {
    "alexnet": (4096, 64), "zfnet": (4096, 64), "vgg11": (4096, 32), "vgg16": (4096, 32),
    "vgg19": (4096, 32), "vgg16_bn": (4096, 32), "spp_net": (4096, 64), "googlenet": (1024, 64),
    "inception_v3": (2048, 75), "inception_resnet_v2": (1536, 75), "resnet18": (512, 32),
    "resnet34": (512, 32), "resnet50": (2048, 32), "resnet101": (2048, 32),
    "resnet152": (2048, 32), "resnet20": (64, 32), "resnet56": (64, 32),
    "advanced_cnn": (256, 32), "vgg11_bn": (4096, 32), "textbook_cnn": (512, 32),
    **{f"efficientnet_lite{i}": (1280, 32) for i in range(5)},
}
OURS = sorted(FEATURES)


def _variables(model, size, batch=1):
  x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                             x, train=False), x)


@functools.lru_cache(maxsize=None)
def _trace(name, num_classes, size):
  """One eval_shape of init: (output shape/dtype, params count, {layer path: output shape}, params)."""
  model = M.create(name, num_classes=num_classes)
  shapes = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and hasattr(out, "shape"):
      shapes["/".join(context.module.scope.path)] = tuple(out.shape)
    return out

  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  with nn.intercept_methods(record):
    out, variables = jax.eval_shape(lambda x: model.init_with_output(rngs, x, train=False), x)
  return out, _count(variables["params"]), shapes, variables["params"]


def _count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def test_every_issue_model_is_registered():
  names = set(M.list_models())
  missing = (set(REFERENCE_PARAMS) | set(DERIVED_PARAMS) | {"advanced_cnn"}) - names
  # mobilenet_* come from another helper's module; only ours must be here.
  missing -= {"mobilenet_v1", "mobilenet_v2"} - names
  assert not missing, f"models not registered: {sorted(missing)}"


@pytest.mark.parametrize("name", sorted(REFERENCE_PARAMS) + sorted(DERIVED_PARAMS))
def test_parameter_count_and_logits_shape(name):
  if name not in M.list_models():
    pytest.skip(f"{name} is not registered (another helper's module)")
  expected = {**REFERENCE_PARAMS, **DERIVED_PARAMS}[name]
  card = M.get_card(name)
  out, count, _, _ = _trace(name, card.default_num_classes, card.input_size)
  assert count == expected
  assert card.reference_params == expected
  assert out.shape == (2, card.default_num_classes) and out.dtype == jnp.float32


@pytest.mark.parametrize("name", OURS)
def test_pooled_feature_shapes(name):
  width, size = FEATURES[name]
  out, count, _, _ = _trace(name, 0, size)
  assert out.shape == (2, width) and out.dtype == jnp.float32
  if name in REFERENCE_PARAMS or name in DERIVED_PARAMS:
    # num_classes=0 removes exactly the classifier (width x 1000 + 1000 biases) and nothing else.
    card = M.get_card(name)
    classes = card.default_num_classes
    assert card.reference_params - count == width * classes + classes


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "vgg16_bn"])
def test_bfloat16_compute_float32_params(name):
  model = M.create(name, dtype=jnp.bfloat16)
  size = FEATURES[name][1]
  variables = _variables(model, size)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                       jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  assert out.dtype == jnp.float32  # logits come back in float32 for the loss
  # Intermediate activations are bfloat16.
  dtypes = []
  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, M.layers.Conv):
      dtypes.append(out.dtype)
    return out
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                   jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  assert dtypes and set(dtypes) == {jnp.dtype(jnp.bfloat16)}


def test_bn_options_reach_every_batchnorm():
  model = M.create("resnet18", bn_momentum=0.7, bn_epsilon=1e-2)
  seen = {}  # per module: jcv's BatchNorm also runs nn.BatchNorm.__call__ outside training
  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm):
      seen[tuple(context.module.scope.path)] = (context.module.momentum, context.module.epsilon)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    _variables(model, 32)
  assert len(seen) == 20 and set(seen.values()) == {(0.7, 1e-2)}


def test_keras_inception_resnet_v2_bn_has_no_scale():
  params = _trace("inception_resnet_v2", 1000, 299)[3]
  bn = params["conv_7b"]["conv_0"]["bn"]
  assert set(bn) == {"bias"}
  assert set(params["block35_1"]["up"]["conv"]) == {"kernel", "bias"}  # linear 1x1 with bias, no BN


def test_paper_feature_map_sizes():
  """The papers' intermediate sizes at the card's input size (eval_shape only)."""
  from jcv.models.alexnet import zf5_trunk

  class Trunk(nn.Module):
    @nn.compact
    def __call__(self, x):
      return zf5_trunk(x)

  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  out = jax.eval_shape(lambda x: Trunk().init_with_output(jax.random.key(0), x)[0], x)
  assert out.shape == (1, 13, 13, 256)  # ZF-5 conv5: 13x13x256 (SPP-net Table 1)
  # GoogLeNet Table 1 (7x7x1024 after 5b), Inception-v3 / -ResNet-v2 8x8 grids at 299 px.
  assert _trace("googlenet", 1000, 224)[2]["inception5b"] == (2, 7, 7, 1024)
  assert _trace("googlenet", 1000, 224)[2]["inception3a"] == (2, 28, 28, 256)
  assert _trace("inception_v3", 1000, 299)[2]["mixed_7c"] == (2, 8, 8, 2048)
  assert _trace("inception_v3", 1000, 299)[2]["mixed_6e"] == (2, 17, 17, 768)
  assert _trace("inception_resnet_v2", 1000, 299)[2]["block17_20"] == (2, 17, 17, 1088)
  assert _trace("inception_resnet_v2", 1000, 299)[2]["conv_7b"] == (2, 8, 8, 1536)
  assert _trace("resnet50", 1000, 224)[2]["stage4_block3"] == (2, 7, 7, 2048)


def test_spp_net_same_features_for_any_size():
  model = M.create("spp_net", num_classes=0)
  variables = _variables(model, 64)
  shapes = set()
  for size in (64, 100, 224):
    out = jax.eval_shape(lambda v, x: model.apply(v, x), variables,
                         jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    spp = jax.eval_shape(lambda x: M.layers.SpatialPyramidPool().apply({}, x),
                         jax.ShapeDtypeStruct((1, size // 16, size // 16, 256), jnp.float32))
    shapes.add((out.shape, spp.shape))
  assert shapes == {((1, 4096), (1, 12800))}  # 256 x (36 + 9 + 4 + 1)
  with pytest.raises(ValueError, match="at least 64"):
    model.apply(variables, jnp.zeros((1, 48, 48, 3)))


def test_unknown_name_lists_available_models():
  with pytest.raises(ValueError, match="unknown model 'resnet1000'.*available:.*resnet18.*vgg16"):
    M.create("resnet1000")
  with pytest.raises(ValueError, match="unknown model"):
    M.get_card("nope")


def test_bad_options_are_value_errors():
  with pytest.raises(ValueError, match="unsupported option.*colour"):
    M.create("resnet18", colour="blue")
  with pytest.raises(ValueError, match="num_classes must be an int >= 0"):
    M.create("vgg16", num_classes=-1)
  with pytest.raises(ValueError, match="shortcut must be"):
    _variables(M.create("resnet20", shortcut="nope"), 32)


def test_cards_describe_and_list_is_sorted():
  names = M.list_models()
  assert names == sorted(names)
  for name in OURS:
    card = M.get_card(name)
    text = card.describe()
    assert name in text and card.paper in text
    assert card.reference_params is not None and card.input_size > 0


@pytest.mark.parametrize("name", ["alexnet", "zfnet", "vgg16_bn", "spp_net", "googlenet",
                                  "inception_v3", "inception_resnet_v2", "resnet50"])
def test_train_mode_traces_with_batch_stats_and_dropout(name):
  """Training-mode call (mutable BN statistics, dropout rng) of every family, shapes only."""
  size = max(FEATURES[name][1], 64)
  model = M.create(name, num_classes=5)

  def train_call(x):
    variables = model.init(jax.random.key(0), x[:1])
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(1)})
    return logits, updates, variables

  logits, updates, variables = jax.eval_shape(
      train_call, jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  assert logits.shape == (2, 5)
  if "batch_stats" in variables:
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  else:  # the pre-BatchNorm nets
    assert name in ("alexnet", "zfnet", "spp_net") and not updates.get("batch_stats")


def test_a_new_family_module_registers_itself(tmp_path, monkeypatch):
  """A module in a discovered package needs no import list: discover() imports it once."""
  from jcv.models import registry
  package = tmp_path / "zoo_extra"
  package.mkdir()
  (package / "__init__.py").write_text("")
  (package / "tiny_family.py").write_text(
      "from jcv.models.registry import ModelCard, register\n"
      "@register(ModelCard('tiny_test_model', reference_params=0))\n"
      "def tiny_test_model(*, num_classes=1000):\n"
      "  return None\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  try:
    assert registry.discover("zoo_extra") == ["zoo_extra.tiny_family"]
    assert "tiny_test_model" in M.list_models()
    assert registry.discover("zoo_extra") == []  # once
  finally:
    registry._REGISTRY.pop("tiny_test_model", None)
  # jcv.models' own families come from the same mechanism.
  assert {"efficientnet_lite2", "mobilenet_v2", "resnet50"} <= set(M.list_models())
