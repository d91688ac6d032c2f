"""Optimizers, schedules, weight-decay masks and parameter groups against closed-form references."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcv.train import Config, create_train_state, losses, optim, train_step
from tiny import TinyCNN, random_images

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 arithmetic, a handful of operations


def _params():
  rng = np.random.default_rng(0)
  return {"Dense_0": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                      "bias": rng.normal(size=(4,)).astype(np.float32)},
          "BatchNorm_0": {"scale": rng.normal(size=(4,)).astype(np.float32),
                          "bias": rng.normal(size=(4,)).astype(np.float32)}}


def _grads(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), _params())


def _updates(cfg, steps=2):
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=10, total_steps=100)
  params = _params()
  state = tx.init(params)
  out = []
  for s in range(steps):
    upd, state = tx.update(_grads(s + 1), state, params)
    out.append(jax.tree.map(np.asarray, upd))
  return out


def test_decay_mask_excludes_bias_and_bn_scale():
  mask = optim.decay_mask(_params())
  assert mask == {"Dense_0": {"kernel": True, "bias": False}, "BatchNorm_0": {"scale": False, "bias": False}}
  assert all(jax.tree.leaves(optim.decay_mask(_params(), decay_bn_and_bias=True)))


def test_decay_mask_on_real_model():
  variables = jax.eval_shape(TinyCNN().init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  mask = optim.decay_mask(variables["params"])
  assert mask["Conv_0"] == {"kernel": True}
  assert mask["BatchNorm_0"] == {"scale": False, "bias": False}
  assert mask["Dense_0"] == {"kernel": True, "bias": False}


def test_sgd_decoupled_decay_matches_numpy():
  lr, mom, wd = 0.1, 0.9, 0.01
  cfg = Config(optimizer="sgd", learning_rate=lr, momentum=mom, nesterov=False, weight_decay=wd,
               schedule="constant")
  got = _updates(cfg)
  p, mask = _params(), optim.decay_mask(_params())
  m = jax.tree.map(np.zeros_like, p)
  for s in range(2):
    g = _grads(s + 1)
    m = jax.tree.map(lambda m_, g_: mom * m_ + g_, m, g)
    want = jax.tree.map(lambda m_, w, k: -lr * (m_ + (wd * w if k else 0.0)), m, p, mask)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got[s], want)


def test_sgd_nesterov_matches_numpy():
  lr, mom = 0.1, 0.9
  cfg = Config(optimizer="sgd", learning_rate=lr, momentum=mom, nesterov=True, weight_decay=0.0,
               schedule="constant")
  got = _updates(cfg)
  m = jax.tree.map(np.zeros_like, _params())
  for s in range(2):
    g = _grads(s + 1)
    m = jax.tree.map(lambda m_, g_: mom * m_ + g_, m, g)
    want = jax.tree.map(lambda m_, g_: -lr * (g_ + mom * m_), m, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got[s], want)


def test_adamw_first_step_matches_formula():
  lr, wd, eps = 1e-3, 0.05, 1e-8
  cfg = Config(optimizer="adamw", learning_rate=lr, weight_decay=wd, eps=eps, schedule="constant")
  got = _updates(cfg, steps=1)[0]
  g, p, mask = _grads(1), _params(), optim.decay_mask(_params())
  # Step 1 with bias correction: m_hat = g, v_hat = g^2.
  want = jax.tree.map(lambda g_, w, k: -lr * (g_ / (np.abs(g_) + eps) + (wd * w if k else 0.0)), g, p, mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_rmsprop_first_step_matches_formula():
  lr, decay, eps = 0.01, 0.9, 1e-8
  cfg = Config(optimizer="rmsprop", learning_rate=lr, rms_decay=decay, eps=eps, momentum=0.0,
               weight_decay=0.0, schedule="constant")
  got = _updates(cfg, steps=1)[0]
  # optax.scale_by_rms puts eps inside the square root (eps_in_sqrt=True).
  want = jax.tree.map(lambda g_: -lr * g_ / np.sqrt((1 - decay) * g_ ** 2 + eps), _grads(1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_gradient_clipping_bounds_global_norm():
  cfg = Config(optimizer="sgd", learning_rate=1.0, momentum=0.0, weight_decay=0.0,
               schedule="constant", grad_clip_norm=0.5)
  upd = _updates(cfg, steps=1)[0]
  norm = math.sqrt(sum(float(np.sum(u ** 2)) for u in jax.tree.leaves(upd)))
  assert norm == pytest.approx(0.5, rel=1e-5)


def _sched(**kw):
  return optim.make_schedule(Config(learning_rate=1.0, **kw), steps_per_epoch=10, total_steps=100)


def test_cosine_with_warmup_values():
  s = _sched(schedule="cosine", warmup_epochs=1.0, final_lr_fraction=0.1)
  assert float(s(0)) == pytest.approx(0.0)
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  t = 55
  want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
  assert float(s(t)) == pytest.approx(want, rel=1e-5)
  assert float(s(100)) == pytest.approx(0.1, rel=1e-5)


def test_onecycle_values():
  s = _sched(schedule="onecycle", onecycle_pct_start=0.3, onecycle_div_factor=25.0,
             onecycle_final_div_factor=1e4)
  assert float(s(0)) == pytest.approx(1 / 25, rel=1e-5)
  assert float(s(30)) == pytest.approx(1.0, rel=1e-5)
  assert float(s(100)) == pytest.approx(1 / 25 / 1e4, rel=1e-3)
  assert max(float(s(t)) for t in range(101)) == pytest.approx(1.0, rel=1e-5)


def test_triangle_matches_airbench_schedule():
  """airbench94's triangle(steps, start=0.2, end=0.07, peak=0.23) as numpy.interp."""
  s = _sched(schedule="triangle", onecycle_pct_start=0.23, onecycle_div_factor=5.0,
             onecycle_final_div_factor=0.2 / 0.07)
  want = np.interp(np.arange(101), [0, int(0.23 * 100), 100], [0.2, 1.0, 0.07])
  np.testing.assert_allclose([float(s(t)) for t in range(101)], want, rtol=1e-5)


def test_step_decay_and_constant_values():
  s = _sched(schedule="step", step_decay_epochs=(3, 6), step_decay_factor=0.1)
  assert [float(s(t)) for t in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
  c = _sched(schedule="constant", warmup_epochs=0.5)
  assert [float(c(t)) for t in (0, 1, 5, 50)] == pytest.approx([0.0, 0.2, 1.0, 1.0])


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="optimizer must be one of"):
    Config(optimizer="adam").validate()
  with pytest.raises(ValueError, match="schedule must be one of"):
    optim.make_schedule(Config(schedule="poly"), steps_per_epoch=1, total_steps=10)


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "cosine"), ("adamw", "onecycle"),
                                                ("rmsprop", "step"), ("lamb", "constant")])
def test_real_step_each_optimizer_and_schedule(optimizer, schedule):
  lr = 0.1 if optimizer == "sgd" else 1e-3
  cfg = Config(optimizer=optimizer, schedule=schedule, learning_rate=lr, warmup_epochs=0.0,
               step_decay_epochs=(5,))
  tx, sched = optim.make_optimizer(cfg, steps_per_epoch=10, total_steps=100)
  state = create_train_state(jax.random.key(0), TinyCNN(), tx, (1, 8, 8, 3))
  images, labels = random_images(16)
  step = jax.jit(functools.partial(train_step, num_classes=10, schedule=sched))
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = step(state, {"image": images, "label": labels})
  assert int(state.step) == 1
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
  assert float(metrics["lr"]) == pytest.approx(float(sched(0)), rel=1e-6)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params))]
  assert all(changed), "every parameter should move after one step"


def test_freeze_and_lr_multipliers():
  images, labels = random_images(16)
  batch = {"image": images, "label": labels}
  def run(**kw):
    cfg = Config(optimizer="sgd", momentum=0.0, weight_decay=0.0, schedule="constant", learning_rate=0.1, **kw)
    tx, sched = optim.make_optimizer(cfg, steps_per_epoch=1, total_steps=10)
    state = create_train_state(jax.random.key(0), TinyCNN(), tx, (1, 8, 8, 3))
    new, _ = jax.jit(functools.partial(train_step, num_classes=10, freeze=cfg.freeze))(state, batch)
    return state, new
  s0, plain = run()
  _, grouped = run(freeze=("Conv_0", "BatchNorm_0"), lr_multipliers={"Dense_0": 0.1})
  for name in ("Conv_0", "BatchNorm_0"):
    jax.tree.map(np.testing.assert_array_equal, grouped.params[name], s0.params[name])
  jax.tree.map(np.testing.assert_array_equal, grouped.batch_stats, s0.batch_stats)
  assert not np.array_equal(plain.batch_stats["BatchNorm_0"]["mean"], s0.batch_stats["BatchNorm_0"]["mean"])
  # The frozen layers change the forward pass only through their BN statistics mode, which is
  # the same (train) in both runs, so the Dense gradient is identical: update scaled by 0.1.
  for leaf in ("kernel", "bias"):
    d_plain = np.asarray(plain.params["Dense_0"][leaf]) - np.asarray(s0.params["Dense_0"][leaf])
    d_group = np.asarray(grouped.params["Dense_0"][leaf]) - np.asarray(s0.params["Dense_0"][leaf])
    np.testing.assert_allclose(d_group, 0.1 * d_plain, rtol=1e-4, atol=1e-7)  # atol: float32 ulp of w - w0
  labels_tree = optim.param_labels(s0.params, freeze=("Conv_0",), lr_multipliers={"Dense": 2.0})
  assert labels_tree["Conv_0"]["kernel"] == optim.FROZEN and labels_tree["Dense_0"]["bias"] == "lr0"
  assert labels_tree["BatchNorm_0"]["scale"] == optim.DEFAULT


def test_l2_in_loss_equals_lecture_formula():
  params = _params()
  mask = optim.decay_mask(params)
  want = 0.5 * float(np.sum(params["Dense_0"]["kernel"] ** 2))
  assert float(losses.l2_penalty(params, mask)) == pytest.approx(want, rel=1e-6)
  # Its gradient times lambda is exactly what the decoupled-free SGD step adds: lambda * w.
  g = jax.grad(lambda p: 0.01 * losses.l2_penalty(p, optim.decay_mask(p)))(params)
  np.testing.assert_allclose(g["Dense_0"]["kernel"], 0.01 * params["Dense_0"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(g["Dense_0"]["bias"], 0.0)


def test_bfloat16_compute_keeps_float32_params():
  from jcv.train import loop
  from run_tiny import BASE
  cfg = BASE.replace(dtype="bfloat16")
  model = loop.build_model(cfg, 10)
  tx, sched = optim.make_optimizer(cfg, steps_per_epoch=10, total_steps=100)
  state = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model, tx, (1, 8, 8, 3)))
  batch = {"image": jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.uint8), "label": jax.ShapeDtypeStruct((4,), jnp.int32)}
  step = functools.partial(train_step, num_classes=10, schedule=sched)
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert {x.dtype for x in jax.tree.leaves(new_state.params)} == {jnp.dtype(jnp.float32)}
  assert metrics["loss"].dtype == jnp.float32
  x = jnp.zeros((4, 8, 8, 3), jnp.float32)
  jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, x, train=False))(state.variables))
  assert "bf16" in jaxpr  # the convolutions and matmuls run in bfloat16


def test_lookahead_matches_airbench_loop():
  """Plain SGD + lookahead (sync every 3 of 10 steps) against a numpy transcription of airbench's
  loop: every k steps ema = d*ema + (1-d)*w, w = ema; at the last step w = ema (d = 1)."""
  lr, total, k, decay, power = 0.1, 10, 3, 0.7, 2.0
  cfg = Config(optimizer="sgd", learning_rate=lr, momentum=0.0, weight_decay=0.0, schedule="constant",
               lookahead_every=k, lookahead_decay=decay, lookahead_power=power,
               freeze=("BatchNorm_0/scale",))
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=total, total_steps=total)
  params = jax.tree.map(jnp.asarray, _params())
  state = tx.init(params)
  w = jax.tree.map(lambda p: np.asarray(p, np.float64), _params())
  ema = jax.tree.map(np.copy, w)
  frozen = np.asarray(params["BatchNorm_0"]["scale"])
  for step in range(1, total + 1):
    g = _grads(step)
    upd, state = tx.update(g, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, upd)
    w = jax.tree.map(lambda w_, g_: w_ - lr * g_, w, g)
    w["BatchNorm_0"]["scale"] = frozen.astype(np.float64)
    if step % k == 0 or step == total:
      d = 1.0 if step == total else decay * (step / total) ** power
      ema = jax.tree.map(lambda e, w_: d * e + (1 - d) * w_, ema, w)
      w = jax.tree.map(np.copy, ema)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), params, w)
  np.testing.assert_array_equal(params["BatchNorm_0"]["scale"], frozen)  # frozen stays bitwise
  # The run ends on the slow weights, which differ from plain SGD's last iterate.
  plain = jax.tree.map(lambda p: np.asarray(p, np.float64), _params())
  for step in range(1, total + 1):
    plain = jax.tree.map(lambda w_, g_: w_ - lr * g_, plain, _grads(step))
  assert np.abs(params["Dense_0"]["kernel"] - plain["Dense_0"]["kernel"]).max() > 1e-3


def test_lookahead_rejects_bad_period_and_missing_params():
  with pytest.raises(ValueError, match="sync_every"):
    optim.lookahead(optax_sgd(), sync_every=0, total_steps=10)
  tx = optim.lookahead(optax_sgd(), sync_every=2, total_steps=10)
  state = tx.init(_params())
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(1), state)


def optax_sgd():
  import optax
  return optax.sgd(0.1)
