"""Optimizers, schedules, weight-decay masks and parameter groups against closed-form references."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcv.train import Config, Lookahead, Muon, losses, optax_extras, optim
from jcv.train.state import create_train_state
from jcv.train.step import train_step
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
  cfg = Config(optim={"name": "sgd", "learning_rate": lr, "momentum": mom, "nesterov": False, "weight_decay": wd},
               schedule={"name": "constant"})
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
  cfg = Config(optim={"name": "sgd", "learning_rate": lr, "momentum": mom, "nesterov": True, "weight_decay": 0.0},
               schedule={"name": "constant"})
  got = _updates(cfg)
  m = jax.tree.map(np.zeros_like, _params())
  for s in range(2):
    g = _grads(s + 1)
    m = jax.tree.map(lambda m_, g_: mom * m_ + g_, m, g)
    want = jax.tree.map(lambda m_, g_: -lr * (g_ + mom * m_), m, g)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got[s], want)


def test_adamw_first_step_matches_formula():
  lr, wd, eps = 1e-3, 0.05, 1e-8
  cfg = Config(optim={"name": "adamw", "learning_rate": lr, "weight_decay": wd, "eps": eps},
               schedule={"name": "constant"})
  got = _updates(cfg, steps=1)[0]
  g, p, mask = _grads(1), _params(), optim.decay_mask(_params())
  # Step 1 with bias correction: m_hat = g, v_hat = g^2.
  want = jax.tree.map(lambda g_, w, k: -lr * (g_ / (np.abs(g_) + eps) + (wd * w if k else 0.0)), g, p, mask)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_rmsprop_first_step_matches_formula():
  lr, decay, eps = 0.01, 0.9, 1e-8
  cfg = Config(optim={"name": "rmsprop", "learning_rate": lr, "rms_decay": decay, "eps": eps, "momentum": 0.0,
                      "weight_decay": 0.0}, schedule={"name": "constant"})
  got = _updates(cfg, steps=1)[0]
  # optax.scale_by_rms puts eps inside the square root (eps_in_sqrt=True).
  want = jax.tree.map(lambda g_: -lr * g_ / np.sqrt((1 - decay) * g_ ** 2 + eps), _grads(1))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_gradient_clipping_bounds_global_norm():
  cfg = Config(optim={"name": "sgd", "learning_rate": 1.0, "momentum": 0.0, "weight_decay": 0.0, "grad_clip_norm": 0.5},
               schedule={"name": "constant"})
  upd = _updates(cfg, steps=1)[0]
  norm = math.sqrt(sum(float(np.sum(u ** 2)) for u in jax.tree.leaves(upd)))
  assert norm == pytest.approx(0.5, rel=1e-5)


def _sched(**kw):
  config = Config(optim={"learning_rate": 1.0}, schedule=kw).validate()
  return optim.make_schedule(config, steps_per_epoch=10, total_steps=100)


def test_cosine_with_warmup_values():
  s = _sched(name="cosine", warmup="1 epochs", final_lr_fraction=0.1)
  assert float(s(0)) == pytest.approx(0.0)
  assert float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  t = 55
  want = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (t - 10) / 90))
  assert float(s(t)) == pytest.approx(want, rel=1e-5)
  assert float(s(100)) == pytest.approx(0.1, rel=1e-5)


def test_onecycle_values():
  s = _sched(name="onecycle", pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
  assert float(s(0)) == pytest.approx(1 / 25, rel=1e-5)
  assert float(s(30)) == pytest.approx(1.0, rel=1e-5)
  assert float(s(100)) == pytest.approx(1 / 25 / 1e4, rel=1e-3)
  assert max(float(s(t)) for t in range(101)) == pytest.approx(1.0, rel=1e-5)


def test_triangle_matches_airbench_schedule():
  """airbench94's triangle(steps, start=0.2, end=0.07, peak=0.23) as numpy.interp."""
  s = _sched(name="triangle", pct_start=0.23, div_factor=5.0, final_div_factor=0.2 / 0.07)
  want = np.interp(np.arange(101), [0, int(0.23 * 100), 100], [0.2, 1.0, 0.07])
  np.testing.assert_allclose([float(s(t)) for t in range(101)], want, rtol=1e-5)


def test_step_decay_and_constant_values():
  s = _sched(name="step", decay_at=("3 epochs", "6 epochs"), decay_factor=0.1)
  assert [float(s(t)) for t in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
  c = _sched(name="constant", warmup="0.5 epochs")
  assert [float(c(t)) for t in (0, 1, 5, 50)] == pytest.approx([0.0, 0.2, 1.0, 1.0])
  # decay_at in steps and in examples (data.batch_size 128): the same boundaries.
  by_steps = _sched(name="step", decay_at=("30 steps", "60 steps"))
  by_examples = _sched(name="step", decay_at=(f"{30 * 128} examples", f"{60 * 128} examples"))
  assert [float(by_steps(t)) for t in (29, 30, 60)] == [float(by_examples(t)) for t in (29, 30, 60)] == \
      pytest.approx([1, 0.1, 0.01])
  assert [float(c(t)) for t in (0, 1, 5, 50)] == pytest.approx([0.0, 0.2, 1.0, 1.0])


def test_unknown_names_raise():
  with pytest.raises(ValueError, match="optim.name must be one of"):
    Config(optim={"name": "adam"}).validate()
  with pytest.raises(ValueError, match="schedule.name must be one of"):
    optim.make_schedule(Config(schedule={"name": "poly"}), steps_per_epoch=1, total_steps=10)


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "cosine"), ("adamw", "onecycle"),
                                                ("rmsprop", "step"), ("lamb", "constant")])
def test_real_step_each_optimizer_and_schedule(optimizer, schedule):
  lr = 0.1 if optimizer == "sgd" else 1e-3
  cfg = Config(optim={"name": optimizer, "learning_rate": lr},
               schedule={"name": schedule, "warmup": "0 epochs",
                         **({"decay_at": ("5 epochs",)} if schedule == "step" else {})}).validate()
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
    cfg = Config(optim={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0, "learning_rate": 0.1, **kw},
                 schedule={"name": "constant"})
    tx, sched = optim.make_optimizer(cfg, steps_per_epoch=1, total_steps=10)
    state = create_train_state(jax.random.key(0), TinyCNN(), tx, (1, 8, 8, 3))
    new, _ = jax.jit(functools.partial(train_step, num_classes=10, freeze=cfg.optim.freeze))(state, batch)
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
  from jcv.train import build
  from run_tiny import BASE
  cfg = BASE.replace(model={"dtype": "bfloat16"})
  model = build.build_model(cfg, 10)
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
  cfg = Config(optim={"name": "sgd", "learning_rate": lr, "momentum": 0.0, "weight_decay": 0.0,
                      "lookahead": Lookahead(every=k, decay=decay, power=power), "freeze": ("BatchNorm_0/scale",)},
               schedule={"name": "constant"})
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


def test_lookahead_is_a_section_with_named_fields():
  assert Config().optim.lookahead is None  # off
  on = Config(optim={"lookahead": {"every": 5, "power": 2.0}})
  assert on.optim.lookahead == Lookahead(every=5, decay=0.95 ** 5, power=2.0)
  assert Config().set(["optim.lookahead.every=3"]).optim.lookahead == Lookahead(every=3)
  assert on.set(["optim.lookahead.decay=0.5"]).optim.lookahead == Lookahead(every=5, decay=0.5, power=2.0)
  with pytest.raises(ValueError, match="unknown field 'evry' \\(did you mean 'every'\\?\\)"):
    Config(optim={"lookahead": {"evry": 5}})
  with pytest.raises(ValueError, match="optim.lookahead.every must be >= 1"):
    Config(optim={"lookahead": {"every": 0}}).validate()


def test_lookahead_rejects_bad_period_and_missing_params():
  with pytest.raises(ValueError, match="sync_every"):
    optax_extras.lookahead(optax.sgd(0.1), sync_every=0, total_steps=10)
  tx = optax_extras.lookahead(optax.sgd(0.1), sync_every=2, total_steps=10)
  state = tx.init(_params())
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(1), state)


def _airbench_muon_steps(w, grads, lr, momentum, ns_steps):
  """numpy transcription of airbench94_muon's Muon.step on a PyTorch OIHW kernel (float64)."""
  a, b, c = (3.4445, -4.7750, 2.0315)
  buf = np.zeros_like(w)
  for g in grads:
    buf = momentum * buf + g
    d = g + momentum * buf  # nesterov
    w = w * (np.sqrt(len(w)) / np.linalg.norm(w))  # p.mul_(len(p)**0.5 / p.norm())
    x = d.reshape(len(d), -1)
    x = x / (np.linalg.norm(x) + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
      x = x.T
    for _ in range(ns_steps):
      gram = x @ x.T
      x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
      x = x.T
    w = w - lr * x.reshape(d.shape)
  return w


@pytest.mark.parametrize("cin,cout", [(3, 8), (8, 4)])  # wide and tall cout x (9 cin) matrices
def test_muon_matches_airbench_transcription(cin, cout):
  rng = np.random.default_rng(1)
  w_oihw = rng.normal(size=(cout, cin, 3, 3))
  grads_oihw = [rng.normal(size=w_oihw.shape) for _ in range(3)]
  want = _airbench_muon_steps(w_oihw, grads_oihw, lr=0.24, momentum=0.6, ns_steps=3)
  to_hwio = lambda x: jnp.asarray(np.transpose(x, (2, 3, 1, 0)), jnp.float32)
  tx = optax_extras.muon(0.24, momentum=0.6, nesterov=True, ns_steps=3, normalize_weights=True)
  params = {"conv": {"kernel": to_hwio(w_oihw)}}
  state = tx.init(params)
  for g in grads_oihw:
    updates, state = tx.update({"conv": {"kernel": to_hwio(g)}}, state, params)
    params = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(params["conv"]["kernel"]), np.transpose(want, (2, 3, 1, 0)),
                             rtol=1e-4, atol=1e-5)


def test_newton_schulz_orthogonalises():
  g = np.random.default_rng(2).normal(size=(16, 72)).astype(np.float32)
  u, s_g, vt = np.linalg.svd(g, full_matrices=False)
  assert s_g.max() / s_g.min() > 2  # g itself is far from orthogonal
  out = np.asarray(optax_extras.newton_schulz(jnp.asarray(g), steps=5))
  s = np.linalg.svd(out, compute_uv=False)
  assert s.min() > 0.5 and s.max() < 1.5  # Muon's U S' V^T with S' ~ (0.5, 1.5)
  rotated = u.T @ out @ vt.T  # diagonal iff out has g's singular vectors
  assert np.abs(rotated - np.diag(np.diag(rotated))).max() < 1e-3
  np.testing.assert_allclose(optax_extras.newton_schulz(jnp.asarray(g.T), steps=5), out.T, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="matrix"):
    optax_extras.newton_schulz(jnp.zeros((2, 3, 4)))


def test_muon_groups_conv_kernels_only_and_trains():
  # Muon on the conv kernels, sgd (momentum 0.9) on the rest.
  cfg = Config(optim={"name": "sgd", "learning_rate": 0.1, "momentum": 0.9, "muon": Muon(learning_rate=0.05),
                      "weight_decay": 5e-4, "weight_decay_mode": "l2", "freeze": ("BatchNorm_0",)},
               schedule={"name": "linear"}).validate()
  tx, sched = optim.make_optimizer(cfg, steps_per_epoch=10, total_steps=100)
  state = create_train_state(jax.random.key(0), TinyCNN(), tx, (1, 8, 8, 3))
  labels = optim.param_labels(state.params, freeze=cfg.optim.freeze, muon=True)
  assert labels["Conv_0"]["kernel"] == optim.MUON and labels["Dense_0"]["kernel"] == optim.DEFAULT
  assert labels["BatchNorm_0"]["scale"] == optim.FROZEN
  mask = optim.muon_mask(state.params, cfg.optim)
  assert not any(jax.tree.leaves(optim.muon_mask(state.params, Config().optim)))  # no muon section: none
  assert optim.decay_mask(state.params, exclude=mask)["Conv_0"]["kernel"] is False
  assert optim.decay_mask(state.params, exclude=mask)["Dense_0"]["kernel"] is True
  images, labels_ = random_images(16)
  from jcv.train import build
  step = jax.jit(build.train_fn(cfg, num_classes=10, augment_fn=None, schedule=sched))
  before = jax.tree.map(np.asarray, state.params)
  for _ in range(3):
    state, metrics = step(state, {"image": images, "label": labels_})
  assert np.isfinite(float(metrics["loss"]))
  assert not np.array_equal(before["Conv_0"]["kernel"], np.asarray(state.params["Conv_0"]["kernel"]))
  np.testing.assert_array_equal(before["BatchNorm_0"]["scale"], state.params["BatchNorm_0"]["scale"])
  with pytest.raises(ValueError, match="optim.name must be one of"):  # what trains the rest must exist
    Config(optim={"name": "adam", "muon": Muon()}).validate()
  with pytest.raises(ValueError, match="optim.name must be one of"):  # Muon is a section, not a name
    Config(optim={"name": "muon"}).validate()


def test_linear_schedule_and_group_lengths():
  cfg = Config(schedule={"name": "linear", "final_lr_fraction": 0.0, "warmup": "0 epochs"},
               optim={"learning_rate": 2.0})
  sched = optim.make_schedule(cfg, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose([float(sched(s)) for s in (0, 25, 100)], [2.0, 1.5, 0.0], rtol=1e-6)
  # airbench94_muon's whitening bias: its rate falls linearly to 0 within the first 3 of 10 epochs.
  cfg = Config(optim={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0, "learning_rate": 1.0,
                      "lr_multipliers": {"bias": 0.5}, "group_lengths": {"bias": "3 epochs"}},
               schedule={"name": "linear"}).validate()
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=10, total_steps=100)
  params = {"Dense_0": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  state = tx.init(params)
  seen = []
  for step in range(35):
    upd, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    seen.append((float(upd["Dense_0"]["kernel"][0, 0]), float(upd["Dense_0"]["bias"][0])))
  assert seen[0] == (-1.0, -0.5)
  assert seen[15][1] == pytest.approx(-0.5 * (1 - 15 / 30), rel=1e-6)  # 15/30 of the squeezed schedule
  assert seen[30][1] == 0.0 and seen[34][1] == 0.0 and seen[34][0] == pytest.approx(-(1 - 34 / 100))
  with pytest.raises(ValueError, match="lr_multipliers"):
    Config(optim={"group_lengths": {"bias": "3 epochs"}}).validate()
  with pytest.raises(ValueError, match="group_lengths.*duration"):
    Config(optim={"lr_multipliers": {"bias": 0.5}, "group_lengths": {"bias": 3}}).validate()
