"""Optax optimizers, schedules, weight-decay masks and parameter groups from a Config.

Parameter paths are "/"-joined names, e.g. ``"Conv_0/kernel"`` or
``"backbone/block_3/BatchNorm_0/scale"``; ``freeze`` and ``lr_multipliers`` match them
with ``re.search``.
"""
from __future__ import annotations

import re
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = [
    "param_paths", "decay_mask", "param_labels", "make_schedule", "make_optimizer",
    "lookahead", "LookaheadState", "FROZEN", "DEFAULT",
]

FROZEN = "frozen"
DEFAULT = "default"
_NO_DECAY_NAMES = ("bias", "scale")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_paths(params):
  """A pytree like ``params`` whose leaves are the "/"-joined parameter paths."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _path_str(path), params)


def decay_mask(params, *, decay_bn_and_bias: bool = False):
  """True where weight decay applies: kernels/embeddings; not biases or BN/LN scales."""
  if decay_bn_and_bias:
    return jax.tree.map(lambda _: True, params)
  def keep(path, leaf):
    name = _path_str(path).rsplit("/", 1)[-1]
    return name not in _NO_DECAY_NAMES and getattr(leaf, "ndim", 0) > 1
  return jax.tree_util.tree_map_with_path(keep, params)


def param_labels(params, *, freeze=(), lr_multipliers=None):
  """Labels each parameter FROZEN, ``"lr<i>"`` (i-th ``lr_multipliers`` pattern) or DEFAULT."""
  freeze_res = [re.compile(p) for p in freeze]
  mult_res = [re.compile(p) for p in (lr_multipliers or {})]
  def label(path, _):
    s = _path_str(path)
    if any(r.search(s) for r in freeze_res):
      return FROZEN
    for i, r in enumerate(mult_res):
      if r.search(s):
        return f"lr{i}"
    return DEFAULT
  return jax.tree_util.tree_map_with_path(label, params)


def make_schedule(config, *, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule named by ``config.schedule`` (peak ``config.learning_rate``)."""
  lr = config.learning_rate
  total_steps = max(int(total_steps), 1)
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps - 1)
  name = config.schedule
  if name == "onecycle":
    return optax.cosine_onecycle_schedule(
        transition_steps=total_steps, peak_value=lr, pct_start=config.onecycle_pct_start,
        div_factor=config.onecycle_div_factor, final_div_factor=config.onecycle_final_div_factor)
  if name == "triangle":  # airbench's: linear up from lr/div to lr at pct_start, linear down
    start = lr / config.onecycle_div_factor
    peak_step = max(1, int(config.onecycle_pct_start * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(start, lr, peak_step),
         optax.linear_schedule(lr, start / config.onecycle_final_div_factor, total_steps - peak_step)],
        [peak_step])
  if name == "cosine":
    if warmup:
      return optax.warmup_cosine_decay_schedule(
          init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
          end_value=lr * config.final_lr_fraction)
    return optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=config.final_lr_fraction)
  if name == "step":
    boundaries = {int(round(e * steps_per_epoch)): config.step_decay_factor
                  for e in config.step_decay_epochs}
    main = optax.piecewise_constant_schedule(lr, {b - warmup: f for b, f in boundaries.items() if b > warmup})
  elif name == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"schedule must be one of cosine, onecycle, triangle, step, constant; got {name!r}")
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _base_optimizer(config, learning_rate, mask) -> optax.GradientTransformation:
  """One optimizer for one parameter group, with decoupled weight decay if asked."""
  wd = config.weight_decay if config.weight_decay_mode == "decoupled" else 0.0
  name = config.optimizer
  if name == "adamw":
    return optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=wd, mask=mask)
  if name == "lamb":
    return optax.lamb(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                      weight_decay=wd, mask=mask)
  if name == "sgd":
    parts = [optax.trace(decay=config.momentum, nesterov=config.nesterov)] if config.momentum else []
  elif name == "rmsprop":
    parts = [optax.scale_by_rms(decay=config.rms_decay, eps=config.eps)]
    if config.momentum:
      parts.append(optax.trace(decay=config.momentum, nesterov=config.nesterov))
  else:
    raise ValueError(f"optimizer must be one of sgd, adamw, rmsprop, lamb; got {name!r}")
  # Decoupled (SGDW-style): lr * wd * w is added after momentum, not folded into it.
  if wd:
    parts.append(optax.add_decayed_weights(wd, mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def make_optimizer(config, *, steps_per_epoch: int, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule) for a Config: optimizer, schedule, decay mask, clipping, groups, freezing.

  Frozen parameters (``config.freeze``) get ``optax.set_to_zero`` and no optimizer state;
  each ``lr_multipliers`` pattern gets its own group whose schedule is scaled.
  """
  schedule = make_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  mask: Callable = lambda p: decay_mask(p, decay_bn_and_bias=config.decay_bn_and_bias)
  multipliers = list((config.lr_multipliers or {}).values())
  grouped = bool(config.freeze or multipliers)
  if not grouped:
    tx = _base_optimizer(config, schedule, mask)
  else:
    transforms = {FROZEN: optax.set_to_zero(), DEFAULT: _base_optimizer(config, schedule, mask)}
    for i, m in enumerate(multipliers):
      transforms[f"lr{i}"] = _base_optimizer(config, _scaled(schedule, float(m)), mask)
    labels = lambda p: param_labels(p, freeze=config.freeze, lr_multipliers=config.lr_multipliers)
    tx = optax.partition(transforms, labels)
  if config.grad_clip_norm:
    prefix = []
    if config.freeze:  # frozen gradients must not count in the clipping norm
      frozen = lambda p: jax.tree.map(lambda l: l == FROZEN, param_labels(p, freeze=config.freeze))
      prefix.append(optax.masked(optax.set_to_zero(), frozen))
    tx = optax.chain(*prefix, optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.lookahead_every:
    tx = lookahead(tx, sync_every=config.lookahead_every, total_steps=total_steps,
                   decay=config.lookahead_decay, power=config.lookahead_power)
  return tx, schedule


class LookaheadState(NamedTuple):
  """State of :func:`lookahead`: the inner optimizer's state, the slow weights, the step count."""
  inner: optax.OptState
  slow: optax.Params
  count: jax.Array


def lookahead(inner: optax.GradientTransformation, *, sync_every: int, total_steps: int,
              decay: float = 0.95 ** 5, power: float = 3.0) -> optax.GradientTransformation:
  """Lookahead with airbench's schedule (Zhang et al. 2019; Jordan 2024).

  ``inner`` updates the fast weights every step; every ``sync_every`` steps the slow weights
  move to ``d * slow + (1 - d) * fast`` and the fast weights are reset to them, with
  ``d = decay * (step / total_steps) ** power`` (0 early: no effect; ``decay`` at the end).
  At ``total_steps`` the fast weights become the slow ones (``d = 1``), so training ends on
  the averaged weights. Needs ``params`` in ``update`` and one extra copy of them in memory.
  """
  if sync_every < 1:
    raise ValueError(f"lookahead sync_every must be >= 1, got {sync_every}")
  total = max(int(total_steps), 1)

  def init(params):
    return LookaheadState(inner.init(params), jax.tree.map(jnp.asarray, params),
                          jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("lookahead needs params in update()")
    inner_updates, inner_state = inner.update(updates, state.inner, params)
    fast = optax.apply_updates(params, inner_updates)
    count = state.count + 1
    last = count >= total
    sync = (count % sync_every == 0) | last
    d = jnp.where(last, 1.0, decay * (count.astype(jnp.float32) / total) ** power)

    def mix(slow, f):
      blended = (d * slow.astype(jnp.float32) + (1 - d) * f.astype(jnp.float32)).astype(slow.dtype)
      return jnp.where(sync & (slow != f), blended, slow)  # untouched (frozen) weights stay bitwise
    slow = jax.tree.map(mix, state.slow, fast)
    new_fast = jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, fast)
    new_updates = jax.tree.map(lambda n, p: (n - p).astype(p.dtype), new_fast, params)
    return new_updates, LookaheadState(inner_state, slow, count)

  return optax.GradientTransformation(init, update)


def _scaled(schedule, factor):
  return lambda step: schedule(step) * factor
