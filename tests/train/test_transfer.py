"""Transfer regimes: parameter labels, frozen parts unchanged, lr groups, feature caching."""
import numpy as np
import optax
import pytest

import jax
import flax.linen as nn
import jax.numpy as jnp

from jcv.models import layers, mobilenet
from jcv.train import Config, build, evaluation, features, optim
from jcv.train import step as step_lib
from jcv.train.state import TrainState, create_train_state, raw_key

SIZE, CLASSES = 16, 3


class TinyStaged(mobilenet.StagedNet):
  """A 4-stage MobileNet-like network: the regimes are generic, and this compiles in seconds."""
  num_classes: int = CLASSES
  dropout_rate: float = 0.0
  frozen_stages: int = 0
  frozen_bn_stages: int = 0
  start_stage: int = 0
  end_stage: int | None = None
  dtype: object = None

  def stage_names(self):
    return ["stem", "block_0", "block_1", "last_conv"]

  def _stage_modules(self):
    return [layers.ConvBNAct(8, 3, strides=2, name="stem"),
            mobilenet.InvertedResidual(8, expansion=2, name="block_0"),
            mobilenet.InvertedResidual(16, expansion=2, strides=2, name="block_1"),
            layers.ConvBNAct(32, 1, name="last_conv")]

  @nn.compact
  def __call__(self, x, train: bool = False):
    return self._run(x, train)


STAGES = TinyStaged().stage_names()


def _model(**options):
  return TinyStaged(**options)


@pytest.fixture(scope="module")
def variables():
  """Random parameters and BN statistics without compiling the model's init."""
  shapes = jax.eval_shape(_model().init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  rng = np.random.default_rng(0)
  out = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  out["batch_stats"] = jax.tree.map(lambda v: np.abs(v) + 0.5, out["batch_stats"])
  return out


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(1)
  return {"image": rng.integers(0, 256, (8, SIZE, SIZE, 3), dtype=np.uint8),
          "label": rng.integers(0, CLASSES, 8).astype(np.int32)}


def _labels(regime, params, **options):
  fields = build.regime_options(regime, stage_names=STAGES, **options)
  labels = optim.param_labels(params, freeze=fields["freeze"], lr_multipliers=fields["lr_multipliers"])
  return {name: set(jax.tree.leaves(sub)) for name, sub in labels.items()}


def test_regime_labels(variables):
  params = variables["params"]
  assert all(v == {optim.DEFAULT} for v in _labels("scratch", params).values())
  frozen = _labels("frozen", params)
  assert frozen.pop("head") == {optim.DEFAULT}
  assert all(v == {optim.FROZEN} for v in frozen.values())
  top3 = _labels("finetune", params, trainable_stages=2)
  assert top3["head"] == {optim.DEFAULT}
  assert {n for n, v in top3.items() if v == {"lr0"}} == {"block_1", "last_conv"}
  assert {n for n, v in top3.items() if v == {optim.FROZEN}} == set(STAGES[:-2])
  options = build.regime_options("finetune", stage_names=STAGES, trainable_stages=2)["model_options"]
  assert options == {"frozen_stages": 2, "frozen_bn_stages": 4}
  assert build.REGIMES == ("scratch", "frozen", "finetune")
  with pytest.raises(ValueError, match="regime must be one of"):
    build.regime_options("partial", stage_names=STAGES)
  with pytest.raises(ValueError, match="trainable_stages"):
    build.regime_options("finetune", stage_names=STAGES, trainable_stages=5)


def _state(model, variables, config):
  tx, _ = optim.make_optimizer(config, steps_per_epoch=1, total_steps=10)
  params = jax.tree.map(jnp.asarray, variables["params"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]),
                    opt_state=tx.init(params), key=raw_key(jax.random.key(0)), apply_fn=model.apply, tx=tx)


SGD = Config(optim={"name": "sgd", "momentum": 0.0, "learning_rate": 0.5, "weight_decay": 0.0},
             schedule={"name": "constant"}, model={"num_classes": CLASSES}, data={"mean": None, "std": None})


def _transfer_config(config, regime, *, stage_names, **options):
  """``config`` training ``regime`` of a staged model: its freeze patterns, rate groups, model options."""
  fields = build.regime_options(regime, stage_names=stage_names, **options)
  return config.replace(optim={"freeze": fields["freeze"], "lr_multipliers": fields["lr_multipliers"]},
                        model={"options": {**config.model.options, **fields["model_options"]}})


def test_finetune_step_freezes_and_scales_backbone_lr(variables, batch):
  config = _transfer_config(SGD, "finetune", stage_names=STAGES, trainable_stages=2, backbone_lr_multiplier=0.1)
  model = _model(**config.model.options)
  state = _state(model, variables, config)
  step = jax.jit(lambda s, b: step_lib.train_step(s, b, num_classes=CLASSES, freeze=config.optim.freeze))
  new, _ = step(state, batch)

  # Reference gradient of the same loss, computed directly.
  x = step_lib.to_model_input(jnp.asarray(batch["image"]))
  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": state.batch_stats}, x, train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy(logits, jax.nn.one_hot(batch["label"], CLASSES)).mean()
  grads = jax.jit(jax.grad(loss))(state.params)
  old, upd = variables["params"], jax.device_get(new.params)
  for name in STAGES[:-2]:  # frozen: bitwise unchanged, and no gradient reaches them
    jax.tree.map(np.testing.assert_array_equal, upd[name], old[name])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[name]))
  for name, lr in (("block_1", 0.05), ("last_conv", 0.05), ("head", 0.5)):
    expected = jax.tree.map(lambda p, g: p - lr * np.asarray(g), old[name], grads[name])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), upd[name], expected)
  # BatchNorm runs in inference mode everywhere (the tutorial's fine-tuning): statistics kept.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new.batch_stats), variables["batch_stats"])


def test_cached_features_train_like_the_full_frozen_model(variables, batch):
  config = _transfer_config(SGD.replace(data={"batch_size": 8}, run={"length": "1 epochs"}), "frozen",
                            stage_names=STAGES)
  model = _model(**config.model.options)
  # The whole model, one step on the images.
  state = _state(model, variables, config)
  step = jax.jit(lambda s, b: step_lib.train_step(s, b, num_classes=CLASSES, freeze=config.optim.freeze))
  full, _ = step(state, batch)
  # Cached: backbone once, then the head alone on its pooled features, with the same step.
  bottom, top = features.split_model(model, len(STAGES))
  feats, labels = features.compute_features(lambda v, x: bottom.apply(v, x), variables, [batch])
  assert feats.shape == (8, 32)
  head_vars = features.top_variables(variables, model, len(STAGES))
  assert set(head_vars["params"]) == {"head"}
  cached, _ = step(_state(top, head_vars, config), {"image": feats, "label": labels})
  np.testing.assert_allclose(cached.params["head"]["kernel"], full.params["head"]["kernel"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(cached.params["head"]["bias"], full.params["head"]["bias"], rtol=1e-4, atol=1e-5)
  # Cached below the top stages, then pooled once: the same features as the whole backbone.
  bottom2, _ = features.split_model(model, 2)
  maps = features.compute_features(lambda v, x: bottom2.apply(v, x), variables, [batch])
  pooled = features.pool_cached(model, variables, {"train": maps}, stage=2)["train"][0]
  np.testing.assert_allclose(pooled, feats, rtol=1e-4, atol=1e-5)
  merged = features.merge_variables(variables, jax.device_get(cached.variables))
  jax.tree.map(np.testing.assert_array_equal, merged["params"]["block_0"], variables["params"]["block_0"])
  # Split in the middle: bottom then top equals the whole network.
  bottom, top = features.split_model(model, 2)
  mid = bottom.apply(variables, jnp.asarray(batch["image"], jnp.float32) / 255.0)
  whole = model.apply(variables, jnp.asarray(batch["image"], jnp.float32) / 255.0)
  np.testing.assert_allclose(top.apply(variables, mid), whole, rtol=1e-4, atol=1e-4)


def test_train_state_starts_from_given_variables(variables):
  tx = optax.sgd(0.1)
  state = create_train_state(jax.random.key(5), _model(), tx, (1, SIZE, SIZE, 3), variables=variables)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), variables["params"])
  random = create_train_state(jax.random.key(5), _model(), tx, (1, SIZE, SIZE, 3))
  np.testing.assert_array_equal(state.key, random.key)  # the run's key does not depend on the init


def test_save_run_is_loadable(tmp_path):
  stages = mobilenet.mobilenet_v2(num_classes=0).stage_names()
  config = _transfer_config(SGD.replace(model={"name": "mobilenet_v2", "options": {"width": 0.35}},
                                        data={"image_size": 32}),
                            "frozen", stage_names=stages)
  model = mobilenet.mobilenet_v2(num_classes=CLASSES, **config.model.options)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
  evaluation.save_run(tmp_path / "run", config, model, variables, class_names=["a", "b", "c"],
                      metrics={"top1": 0.5, "loss": 1.0})
  loaded_config, names, state, _ = evaluation.load_run(tmp_path / "run")
  assert names == ["a", "b", "c"] and loaded_config.model.options["frozen_stages"] == 19
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), variables["params"])


def test_cache_features_views_and_disk_cache(variables, tmp_path):
  from jcv.data.sources import ArraySource
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (10, 20, 20, 3), dtype=np.uint8)
  source = ArraySource(images, np.arange(10) % CLASSES)
  model = _model()
  kwargs = dict(stage=2, image_size=SIZE, batch_size=4, directory=tmp_path, log=None)
  cached = features.cache_features(model, variables, {"train": source, "test": source}, crop_views=2, **kwargs)
  x, y = cached["train"]
  assert x.shape[0] == 2 * 10 + 2 * 8  # original + mirror, then 2 epochs of crops (ragged batch dropped)
  np.testing.assert_array_equal(y[:10], source.labels)
  np.testing.assert_array_equal(y[10:20], source.labels)
  assert cached["test"][0].shape[0] == 10
  # The mirror view is the mirrored image's features (eval transform: resize + centre crop).
  mirrored = ArraySource(images[:, :, ::-1].copy(), source.labels)
  flipped = features.cache_features(model, variables, {"test": mirrored}, stage=2, image_size=SIZE,
                                    batch_size=4, log=None)["test"][0]
  np.testing.assert_allclose(x[10:20], flipped, rtol=1e-5, atol=1e-5)
  files = sorted(tmp_path.glob("*.npz"))
  assert len(files) == 2  # train, test
  again = features.cache_features(model, variables, {"train": source}, crop_views=2, **kwargs)
  np.testing.assert_array_equal(again["train"][0], x)  # read back from tmp_path
  assert sorted(tmp_path.glob("*.npz")) == files


def test_feature_cache_key_changes_with_weights_seed_and_data(variables, tmp_path):
  """#16: a cache file is never reused after the weights, the seed or the data change."""
  from jcv.data.sources import ArraySource
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (8, 20, 20, 3), dtype=np.uint8)
  source = ArraySource(images, np.arange(8) % CLASSES)
  model = _model()

  def run(vars_=variables, src=source, **kw):
    out = features.cache_features(model, vars_, {"train": src}, stage=2, image_size=SIZE, batch_size=4,
                                  directory=tmp_path, log=None, **kw)
    return out["train"][0], {p.name for p in tmp_path.glob("*.npz")}

  x, files = run()
  x_again, files_again = run()
  assert files_again == files and len(files) == 1
  nan_weights = jax.tree.map(lambda v: np.full_like(v, np.nan), variables)
  x_nan, files = run(vars_=nan_weights)
  assert len(files) == 2 and np.isnan(x_nan).all() and not np.isnan(x).any()
  other = ArraySource(images[::-1].copy(), source.labels)
  _, files = run(src=other)
  assert len(files) == 3
  _, files = run(crop_views=1, seed=1)
  _, files2 = run(crop_views=1, seed=2)
  assert len(files2) == len(files) + 1 == 5
  assert not list(tmp_path.glob("*.tmp.npz"))


def test_feature_loader_shuffles_per_epoch_and_resumes():
  from jcv.train.features import FeatureLoader
  x, y = np.arange(10, dtype=np.float32)[:, None], np.arange(10)
  loader = FeatureLoader(x, y, batch_size=4, seed=0)
  assert loader.steps_per_epoch == 2
  it = loader.iter_from(0)
  seen = [next(it)["label"] for _ in range(6)]
  rng = np.random.default_rng(0)
  orders = [rng.permutation(10) for _ in range(3)]
  for step, labels in enumerate(seen):
    np.testing.assert_array_equal(labels, orders[step // 2][(step % 2) * 4:(step % 2) * 4 + 4])
  resumed = FeatureLoader(x, y, batch_size=4, seed=0).iter_from(0)
  resumed.set_state(it.get_state())
  np.testing.assert_array_equal(next(resumed)["label"], next(it)["label"])
  ev = list(FeatureLoader(x, y, batch_size=4, train=False))
  assert len(ev) == 3 and ev[-1]["mask"].tolist() == [True, True, False, False]


def test_cached_run_with_nan_weights_stops_on_the_loss(variables, tmp_path):
  """#16: NaN weights give NaN features; the cached run stops like any run, naming the step."""
  from jcv.data.sources import ArraySource
  from jcv.train import fit, loop
  rng = np.random.default_rng(5)
  source = ArraySource(rng.integers(0, 256, (16, SIZE, SIZE, 3), dtype=np.uint8), np.arange(16) % CLASSES,
                       class_names=["a", "b", "c"])
  nan = jax.tree.map(lambda v: np.full_like(v, np.nan), variables)
  config = SGD.replace(init={"trainable": "head", "feature_cache": {}},
                       data={"batch_size": 8, "eval_split": "", "image_size": SIZE}, augment={"ops": ()},
                       run={"length": "1 epochs", "progress": False, "plots": False, "compilation_cache": None})
  with pytest.raises(loop.NonFiniteLossError, match="at step 1"):
    fit(config, workdir=tmp_path, train_source=source, model=_model(), init_variables=nan)


def test_trainable_backbone_is_every_stage_with_bn_in_inference_mode():
  model = _model()
  every = build.train_config(SGD.replace(init={"trainable": "backbone", "backbone_lr_multiplier": 0.1}), model)
  counted = build.train_config(SGD.replace(init={"trainable": len(STAGES), "backbone_lr_multiplier": 0.1}), model)
  assert (every.optim.freeze, every.optim.lr_multipliers, every.model.options) == \
      (counted.optim.freeze, counted.optim.lr_multipliers, counted.model.options)
  assert every.optim.freeze == () and every.model.options["frozen_bn_stages"] == len(STAGES)
  assert every.optim.lr_multipliers == {build.NOT_HEAD: 0.1}
  assert build.train_config(SGD, model) is SGD  # trainable "all": nothing changes
  assert features.cut_stage(SGD.replace(init={"trainable": "backbone"}), model) == 0
  assert features.cut_stage(SGD.replace(init={"trainable": 1}), model) == len(STAGES) - 1
  assert features.cut_stage(SGD.replace(init={"trainable": "head"}), model) == len(STAGES)
  with pytest.raises(ValueError, match="trainable"):
    SGD.replace(init={"trainable": "top"}).validate()
