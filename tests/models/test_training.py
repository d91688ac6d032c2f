"""Small models really run: forward + backward, train vs eval mode, a few SGD steps learn.

Only tiny graphs are compiled (resnet20 and advanced_cnn on small images).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jcv.models as M


def _batch(size, classes, n=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % classes
  # Class-dependent brightness so the batch is learnable.
  images = rng.normal(size=(n, size, size, 3)).astype(np.float32) * 0.5 + labels[:, None, None, None]
  return jnp.asarray(images), jnp.asarray(labels)


def _train_steps(model, images, labels, steps, lr):
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, images[:1])
  tx = optax.sgd(lr, momentum=0.9)

  def loss_fn(params, batch_stats, key):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                  mutable=["batch_stats"], rngs={"dropout": key})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state, key):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, grads

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  losses, first_grads = [], None
  for i in range(steps):
    params, batch_stats, opt_state, loss, grads = step(params, batch_stats, opt_state, jax.random.key(i))
    first_grads = grads if first_grads is None else first_grads
    losses.append(float(loss))
  return variables, {"params": params, "batch_stats": batch_stats}, losses, first_grads


@pytest.mark.parametrize("name,size,options", [("resnet20", 16, {}), ("advanced_cnn", 32, {"widths": (8, 16)})])
def test_forward_backward_and_learning(name, size, options):
  card = M.get_card(name)
  model = M.create(name, **options)
  images, labels = _batch(size, card.default_num_classes)
  before, after, losses, grads = _train_steps(model, images, labels, steps=8, lr=0.05)
  # Every parameter gets a finite gradient, and almost all a non-zero one.
  leaves = jax.tree.leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(bool(jnp.any(g != 0)) for g in leaves) == len(leaves)
  # BatchNorm running statistics moved during training.
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), before["batch_stats"], after["batch_stats"])
  assert all(jax.tree.leaves(moved))
  assert losses[-1] < 0.7 * losses[0], losses


def test_train_and_eval_modes_differ_with_batchnorm():
  model = M.create("resnet20")
  images, _ = _batch(16, 10, n=4)
  variables = model.init(jax.random.key(0), images[:1])

  @jax.jit
  def run(variables, images):
    eval_out = model.apply(variables, images, train=False)
    train_out, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
    return eval_out, train_out, model.apply(variables, images[:2]), updates

  eval_out, train_out, eval_half, updates = run(variables, images)
  assert not np.allclose(eval_out, train_out, atol=1e-3)  # batch statistics vs running ones
  # Eval mode is a pure function of each input: the batch composition does not matter.
  np.testing.assert_allclose(eval_half, eval_out[:2], rtol=1e-5, atol=1e-5)
  assert set(updates) == {"batch_stats"}


def test_dropout_only_in_train_mode():
  model = M.create("advanced_cnn", widths=(8,), dropout_rate=0.5)
  images, _ = _batch(16, 2, n=4)
  variables = model.init(jax.random.key(0), images[:1])
  run = jax.jit(lambda key: model.apply(variables, images, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": key})[0])
  np.testing.assert_array_equal(run(jax.random.key(1)), run(jax.random.key(1)))
  assert not np.allclose(run(jax.random.key(1)), run(jax.random.key(2)))
  evaluate = jax.jit(lambda v: model.apply(v, images))
  np.testing.assert_array_equal(evaluate(variables), evaluate(variables))
  with pytest.raises(Exception, match="dropout"):  # train mode needs a "dropout" rng
    jax.eval_shape(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]), variables)


def test_bfloat16_forward_close_to_float32():
  images, _ = _batch(16, 10, n=2)
  f32, bf16 = M.create("resnet20"), M.create("resnet20", dtype=jnp.bfloat16)
  variables = f32.init(jax.random.key(0), images[:1])
  a = jax.jit(f32.apply)(variables, images)
  b = jax.jit(bf16.apply)(variables, images)  # same float32 parameters
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(b, a, rtol=0.1, atol=0.1 * float(jnp.abs(a).max()))
