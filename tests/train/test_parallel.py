"""Data parallelism: 8 fake CPU devices give the same parameters as 1 device, in both modes."""
import functools

import jax
import numpy as np
import pytest

from jcv.data.augment import make_augment
from jcv.train import Config, Optim, optim, parallel
from jcv.train.state import create_train_state
from jcv.train.step import train_step
from tiny import TinyCNN, random_images

# Same global batch, same math; only the reduction order of float32 sums differs.
ATOL = 2e-6


def _run(model, mode, ndev, *, steps=3, augment=None):
  cfg = Config(optim=Optim(name="sgd", learning_rate=0.1, weight_decay=5e-4))
  tx, sched = optim.make_optimizer(cfg, steps_per_epoch=10, total_steps=100)
  mesh = parallel.make_mesh(jax.devices()[:ndev])
  state = parallel.replicate(create_train_state(jax.random.key(0), model, tx, (1, 8, 8, 3)), mesh)
  fn = parallel.compile_train_step(
      functools.partial(train_step, num_classes=10, schedule=sched, augment_fn=augment), mesh, mode=mode)
  images, labels = random_images(32)
  for s in range(steps):
    batch = {"image": np.roll(images, s, axis=0), "label": np.roll(labels, s)}
    state, metrics = fn(state, parallel.shard_batch(batch, mesh))
  return parallel.fetch(state.params), parallel.fetch(state.batch_stats), parallel.fetch(metrics)


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_jit_8_devices_equals_1_with_bn_dropout_and_augmentation():
  assert jax.device_count() >= 8
  model = TinyCNN(use_bn=True, dropout_rate=0.3)
  augment = make_augment(["flip", ("pad_crop", {"padding": 2})], num_classes=10)
  p1, s1, m1 = _run(model, "jit", 1, augment=augment)
  p8, s8, m8 = _run(model, "jit", 8, augment=augment)
  # GSPMD: BN statistics over the global batch, and random bits independent of sharding.
  assert _max_diff(p1, p8) < ATOL
  assert _max_diff(s1, s8) < ATOL
  assert m1["loss"] == pytest.approx(m8["loss"], abs=1e-5)


def test_pmap_8_devices_equals_1():
  model = TinyCNN(use_bn=False)
  p1, _, m1 = _run(model, "jit", 1)
  p8, _, m8 = _run(model, "pmap", 8)
  assert _max_diff(p1, p8) < ATOL
  for k in ("loss", "top1", "top5", "grad_norm", "lr"):
    assert m1[k] == pytest.approx(m8[k], rel=1e-5, abs=1e-6)
  # (A psum-then-pmean mistake in the gradient would move parameters 8x too far.)


def test_pmap_bn_running_mean_is_global_mean():
  # BN statistics are synchronised over devices in pmap mode (sync_batch_stats=True), so the
  # running mean after one step equals the global-batch running mean.
  model = TinyCNN(use_bn=True)
  _, s1, _ = _run(model, "jit", 1, steps=1)
  _, s8, _ = _run(model, "pmap", 8, steps=1)
  np.testing.assert_allclose(s8["BatchNorm_0"]["mean"], s1["BatchNorm_0"]["mean"], atol=1e-6)


def test_shard_batch_rejects_indivisible_batch():
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match="not divisible"):
    parallel.shard_batch({"image": np.zeros((12, 8, 8, 3), np.uint8)}, mesh)


def test_eval_sums_equal_in_both_modes_with_padding():
  from jcv.train.step import eval_step
  cfg = Config()
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=1, total_steps=1)
  images, labels = random_images(16)
  mask = np.arange(16) < 11  # the last 5 rows are padding
  batch = {"image": images, "label": labels, "mask": mask}
  sums = {}
  for mode, ndev in (("jit", 1), ("jit", 8), ("pmap", 8)):
    mesh = parallel.make_mesh(jax.devices()[:ndev])
    state = parallel.replicate(create_train_state(jax.random.key(0), TinyCNN(), tx, (1, 8, 8, 3)), mesh)
    fn = parallel.compile_eval_step(eval_step, mesh, mode=mode)
    sums[(mode, ndev)] = parallel.fetch(fn(state, parallel.shard_batch(batch, mesh)))
  ref = sums[("jit", 1)]
  assert float(ref["count"]) == 11
  for got in sums.values():
    for k in ("loss", "top1", "top5", "count"):
      assert float(got[k]) == pytest.approx(float(ref[k]), rel=1e-5)
