"""How many training steps fit in a time budget, measured on this machine (``jcv train --minutes``).

The config's own train step (model, optimizer, augmentation, device mesh) is compiled and
timed on a few random batches; the compiled program lands in JAX's compilation cache, so the
run itself does not compile it again. A fifth of the budget is kept for compilation,
evaluations and the final report.
"""
from __future__ import annotations

import time

import jax

from jcv.train import build, init_from, parallel
from jcv.train.config import Config
from jcv.train.optim import make_optimizer
from jcv.train.state import create_train_state

__all__ = ["step_seconds", "steps_within"]

TRAINING_SHARE = 0.8  # of the budget; the rest: compilation, evaluations, the report


def step_seconds(config: Config, num_classes: int, *, steps: int = 3) -> tuple[float, float]:
  """(seconds per training step, seconds to compile it) of ``config`` on random uint8 batches
  (``data.mean``/``std`` of ``"pretrained"`` resolved to the weights' numbers first), on the
  devices ``run.devices`` trains on; with "auto" the compile time includes choosing them."""
  config = init_from.resolve_preprocessing(config)
  model = build.build_model(config, num_classes)
  tconfig = build.train_config(config, model)
  if config.init.trainable != "all":
    model = model.clone(**build.stage_options(tconfig))
  tx, schedule = make_optimizer(tconfig, steps_per_epoch=100, total_steps=1000)
  shape = build.example_shape(config)
  train_fn = build.train_fn(tconfig, num_classes=num_classes, augment_fn=build.build_augment(config, num_classes),
                            schedule=schedule)
  batch = build.random_batch(config.data.batch_size, shape, num_classes)
  state = create_train_state(jax.random.key(0), model, tx, (1,) + shape)
  started = time.perf_counter()  # "auto" compiles and times both meshes here, as the run will
  mesh = build.train_mesh(config, train_fn, state, input_shape=shape, num_classes=num_classes)
  state = parallel.replicate(state, mesh)
  fn = parallel.compile_train_step(train_fn, mesh, mode=config.run.parallel)
  fn = fn.lower(state, parallel.batch_spec(mesh, config.data.batch_size, shape)).compile()
  compile_s = time.perf_counter() - started
  state, _ = fn(state, parallel.shard_batch(batch, mesh))  # warm-up
  parallel.fetch(state.step)
  started = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, parallel.shard_batch(batch, mesh))
  parallel.fetch(metrics)
  return (time.perf_counter() - started) / steps, compile_s


def steps_within(config: Config, train_source, *, minutes: float) -> int:
  """Training steps of ``config`` that fit in ``minutes`` (a share of it: :data:`TRAINING_SHARE`)."""
  if minutes <= 0:
    raise ValueError(f"--minutes must be > 0, got {minutes}")
  classes = config.model.num_classes or len(getattr(train_source, "class_names", []) or []) or 2
  per_step, compile_s = step_seconds(config, classes)
  steps = int((minutes * 60 * TRAINING_SHARE - 2 * compile_s) / per_step)
  print(f"--minutes {minutes:g}: one step takes {per_step:.2f} s here, so {max(steps, 1)} steps "
        f"({max(steps, 1) * config.data.batch_size / len(train_source):.1f} epochs) fit")
  return steps
