"""Device-count invariance: 1, 2 and 8 devices give the same parameters for the same global
batch, in jit and pmap mode, with BatchNorm, dropout and augmentation (jcv.train.invariance)."""
import functools

import jax
import numpy as np
import pytest

from jcv.data.augment import make_augment
from jcv.train import Config, Optim, optim, parallel
from jcv.train.state import create_train_state
from jcv.train.step import train_step
from tiny import TinyCNN, random_images

# Same global batch, same random bits per example; only float32 reduction orders differ
# (BatchNorm moments and gradients summed per device, then across devices).
ATOL = 5e-6


def _run(mode, ndev, *, steps=3, sync=True):
  model = TinyCNN(use_bn=True, dropout_rate=0.3)
  augment = make_augment(["flip", ("pad_crop", {"padding": 2})], num_classes=10)
  cfg = Config(optim=Optim(name="sgd", learning_rate=0.1, weight_decay=5e-4))
  tx, sched = optim.make_optimizer(cfg, steps_per_epoch=10, total_steps=100)
  mesh = parallel.make_mesh(jax.devices()[:ndev])
  state = parallel.replicate(create_train_state(jax.random.key(3), model, tx, (1, 8, 8, 3)), mesh)
  fn = parallel.compile_train_step(functools.partial(
      train_step, num_classes=10, schedule=sched, augment_fn=augment, sync_batch_stats=sync), mesh, mode=mode)
  images, labels = random_images(32)
  for s in range(steps):
    batch = {"image": np.roll(images, s, axis=0), "label": np.roll(labels, s)}
    state, metrics = fn(state, parallel.shard_batch(batch, mesh))
  return parallel.fetch({"params": state.params, "batch_stats": state.batch_stats}), parallel.fetch(metrics)


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_1_2_8_devices_same_params_in_both_modes():
  ref, mref = _run("jit", 1)
  for mode, ndev in (("jit", 2), ("jit", 8), ("pmap", 1), ("pmap", 2), ("pmap", 8)):
    got, m = _run(mode, ndev)
    assert _max_diff(ref, got) < ATOL, (mode, ndev, _max_diff(ref, got))
    assert m["loss"] == pytest.approx(mref["loss"], abs=1e-5)


def test_per_device_batch_stats_is_an_explicit_option():
  ref, _ = _run("pmap", 1, sync=False)  # one device: per-device statistics are the global ones
  local, _ = _run("pmap", 8, sync=False)
  assert _max_diff(ref, local) > 1e-4  # 4 examples per device: other statistics, other weights
