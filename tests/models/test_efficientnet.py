"""EfficientNet-Lite: block layout, TF "SAME" padding at odd sizes, drop-connect, transfer steps."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcv.models as M
from jcv import kernels
from jcv.models import efficientnet, layers, mobilenet
from jcv.train import Config, Data, Init, Model, Optim, Schedule, build, optim
from jcv.train import step as step_lib
from jcv.train.state import TrainState, raw_key


def test_lite2_layout_matches_the_weight_file():
  """Kernel, stride, channels per block as in efficientnet_lite2.npz (../shared/weights)."""
  blocks = efficientnet.lite_blocks(1.1, 1.2)
  assert len(blocks) == 21
  assert [b[3] for b in blocks] == [16] + [24] * 3 + [48] * 3 + [88] * 4 + [120] * 4 + [208] * 5 + [352]
  assert [b[0] for b in blocks] == [3] * 4 + [5] * 3 + [3] * 4 + [5] * 9 + [3]
  assert [i for i, b in enumerate(blocks) if b[1] == 2] == [1, 4, 7, 15]
  model = M.create("efficientnet_lite2")
  assert model.stage_names()[:2] == ["stem", "block_0"] and model.stage_names()[-1] == "last_conv"
  assert len(model.stage_names()) == 23 and model.dropout_rate == 0.3
  assert [len(efficientnet.lite_blocks(*efficientnet.EFFICIENTNET_LITE_SCALING[f"efficientnet_lite{i}"][:2]))
          for i in range(5)] == [16, 21, 21, 24, 30]


def _tf_same_conv(x, w, stride):
  """TF "SAME" convolution in NumPy: pad_total = max((ceil(n/s) - 1) * s + k - n, 0), the
  extra row/column after (../shared/weights/README.md). ``w`` HWIO; I == 1 is depthwise."""
  n, h, wd, c = x.shape
  kh, kw, ci, co = w.shape
  pads = []
  for size, k in ((h, kh), (wd, kw)):
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    pads.append((total // 2, total - total // 2))
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh, ow = -(-h // stride), -(-wd // stride)
  out = np.zeros((n, oh, ow, co))
  for i in range(oh):
    for j in range(ow):
      patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw, :]
      if ci == 1 and c > 1:
        out[:, i, j, :] = np.einsum("nhwc,hwc->nc", patch, w[:, :, 0, :])
      else:
        out[:, i, j, :] = np.einsum("nhwc,hwco->no", patch, w)
  return out


@pytest.mark.parametrize("lowering", ["cpu", "xla"])
@pytest.mark.parametrize("size", [7, 8, 9, 13])
def test_same_padding_is_tf_same_at_any_size(lowering, size):
  rng = np.random.default_rng(size)
  x = rng.standard_normal((2, size, size + 2, 6)).astype(np.float32)
  cases = [(rng.standard_normal((3, 3, 6, 4)), 2, 1),    # stem-like 3x3/2
           (rng.standard_normal((5, 5, 1, 6)), 2, 6),    # depthwise 5x5/2
           (rng.standard_normal((5, 5, 1, 6)), 1, 6),    # depthwise 5x5/1
           (rng.standard_normal((1, 1, 6, 4)), 1, 1)]    # 1x1
  with kernels.lowering(lowering):
    for w, stride, groups in cases:
      w = w.astype(np.float32)
      got = kernels.conv2d(jnp.asarray(x), jnp.asarray(w), strides=stride, padding="SAME", groups=groups)
      np.testing.assert_allclose(np.asarray(got), _tf_same_conv(x, w, stride), rtol=1e-4, atol=1e-4)
  # PyTorch-style symmetric padding differs at even sizes with stride 2 (the test can tell).
  if size % 2 == 0:
    w = cases[0][0].astype(np.float32)
    symmetric = kernels.conv2d(jnp.asarray(x), jnp.asarray(w), strides=2, padding=((1, 1), (1, 1)))
    assert not np.allclose(np.asarray(symmetric), _tf_same_conv(x, w, 2), atol=1e-3)


def test_drop_path_drops_whole_examples():
  x = jnp.ones((2000, 2, 2, 3))
  y = np.asarray(layers.drop_path(jax.random.key(0), x, rate=0.25))
  per_example = y.reshape(2000, -1)
  assert set(np.unique(per_example.min(1))) <= {0.0, np.float32(1 / 0.75)}
  assert np.all(per_example.min(1) == per_example.max(1))
  assert abs((per_example[:, 0] > 0).mean() - 0.75) < 0.04
  with pytest.raises(ValueError, match="rate"):
    layers.drop_path(jax.random.key(0), x, rate=1.0)


def test_block_drop_connect_only_in_training():
  block = mobilenet.InvertedResidual(8, expansion=2, kernel_size=5, drop_path_rate=0.5)
  x = jax.random.normal(jax.random.key(0), (64, 6, 6, 8))
  variables = block.init(jax.random.key(1), x)
  base = block.clone(drop_path_rate=0.0)
  def train(b, key):
    return b.apply(variables, x, True, rngs={"dropout": key}, mutable=["batch_stats"])[0]
  y, plain = train(block, jax.random.key(2)), train(base, jax.random.key(2))
  branch = np.asarray(plain - x)
  kept = np.asarray(jnp.abs(y - x).reshape(64, -1).max(1) > 0)
  assert 0 < kept.sum() < 64
  np.testing.assert_allclose(np.asarray(y - x)[kept], 2 * branch[kept], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(y)[~kept], np.asarray(x)[~kept])
  np.testing.assert_array_equal(block.apply(variables, x), base.apply(variables, x))  # eval


def _block_flags(model):
  """(train flag, bn_frozen) each block is called with, from a train-mode trace."""
  seen = {}
  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, mobilenet.InvertedResidual) and context.method_name == "__call__":
      seen[context.module.name] = (bool(args[1]), context.module.bn_frozen)
    return next_fun(*args, **kwargs)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init_with_output({"params": jax.random.key(0), "dropout": jax.random.key(1)},
                                                    x, train=True), x)
  return seen


def test_regimes_keep_drop_connect_in_trained_stages():
  names = M.create("efficientnet_lite0").stage_names()
  options = build.regime_options("finetune", stage_names=names, trainable_stages=4)["model_options"]
  flags = _block_flags(M.create("efficientnet_lite0", **options))
  frozen = {f"block_{i}" for i in range(len(names) - 4 - 1)}  # stem + blocks below the top 4 stages
  assert {n for n, (train, _) in flags.items() if not train} == frozen
  assert all(bn_frozen for _, bn_frozen in flags.values())  # BN in inference mode everywhere
  frozen_all = build.regime_options("frozen", stage_names=names)["model_options"]
  assert not any(train for train, _ in _block_flags(M.create("efficientnet_lite0", **frozen_all)).values())


# ----------------------------------------------------------------------------- train steps

SIZE, CLASSES = 64, 3
SGD = Config(optim=Optim(name="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.0),
             schedule=Schedule(name="constant"), model=Model(name="efficientnet_lite0", num_classes=CLASSES),
             data=Data(mean=(127 / 255,) * 3, std=(128 / 255,) * 3))
TRAINABLE = {"frozen": "head", "finetune": None}  # finetune: the top trainable_stages


@pytest.fixture(scope="module")
def lite0_variables():
  model = M.create("efficientnet_lite0", num_classes=CLASSES)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  rng = np.random.default_rng(0)
  out = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  out["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5, out["batch_stats"])
  return out


def _step(regime, variables, trainable_stages=None, backbone_lr_multiplier=1.0):
  names = M.create("efficientnet_lite0").stage_names()
  init = Init(trainable=TRAINABLE[regime] or trainable_stages, backbone_lr_multiplier=backbone_lr_multiplier)
  config = build.train_config(SGD.replace(init=init), M.create("efficientnet_lite0"))  # freeze, groups, stages
  model = M.create("efficientnet_lite0", num_classes=CLASSES, **config.model.options)
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1, total_steps=10)
  params = jax.tree.map(jnp.asarray, variables["params"])
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                     batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]),
                     opt_state=tx.init(params), key=raw_key(jax.random.key(0)), apply_fn=model.apply, tx=tx)
  rng = np.random.default_rng(1)
  batch = {"image": rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8),
           "label": np.array([0, 2], np.int32)}
  new, metrics = jax.jit(lambda s, b: step_lib.train_step(
      s, b, num_classes=CLASSES, freeze=config.optim.freeze, mean=config.data.mean, std=config.data.std))(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  return names, jax.device_get(new.params), jax.device_get(new.batch_stats)


def _changed(new, old, name):
  return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new[name]), jax.tree.leaves(old[name])))


def test_frozen_regime_trains_only_the_head(lite0_variables):
  names, params, stats = _step("frozen", lite0_variables)
  old = lite0_variables["params"]
  assert _changed(params, old, "head")
  assert not any(_changed(params, old, n) for n in names)
  jax.tree.map(np.testing.assert_array_equal, stats, lite0_variables["batch_stats"])


def test_finetune_regime_trains_the_top_stages(lite0_variables):
  names, params, stats = _step("finetune", lite0_variables, trainable_stages=2, backbone_lr_multiplier=0.1)
  old = lite0_variables["params"]
  assert [n for n in names + ["head"] if _changed(params, old, n)] == ["block_15", "last_conv", "head"]
  jax.tree.map(np.testing.assert_array_equal, stats, lite0_variables["batch_stats"])  # BN frozen
