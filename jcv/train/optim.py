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
    "lookahead", "LookaheadState", "muon", "MuonState", "newton_schulz", "muon_mask", "FROZEN",
    "DEFAULT", "MUON", "OPTIMIZERS", "SCHEDULES", "optimizer_options", "schedule_options",
]

FROZEN = "frozen"
DEFAULT = "default"
MUON = "muon"
_NO_DECAY_NAMES = ("bias", "scale")


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_paths(params):
  """A pytree like ``params`` whose leaves are the "/"-joined parameter paths."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _path_str(path), params)


def decay_mask(params, *, decay_bn_and_bias: bool = False, exclude=None):
  """True where weight decay applies: kernels/embeddings; not biases or BN/LN scales.

  ``exclude``: a pytree of bools like ``params`` (e.g. :func:`muon_mask`); True leaves get no decay.
  """
  if decay_bn_and_bias:
    mask = jax.tree.map(lambda _: True, params)
  else:
    def keep(path, leaf):
      name = _path_str(path).rsplit("/", 1)[-1]
      return name not in _NO_DECAY_NAMES and getattr(leaf, "ndim", 0) > 1
    mask = jax.tree_util.tree_map_with_path(keep, params)
  if exclude is not None:
    mask = jax.tree.map(lambda m, e: bool(m and not e), mask, exclude)
  return mask


def param_labels(params, *, freeze=(), lr_multipliers=None, muon: bool = False):
  """Labels each parameter FROZEN, ``"lr<i>"`` (i-th ``lr_multipliers`` pattern), MUON or DEFAULT.

  ``muon=True``: the 4-D (convolution) kernels that are neither frozen nor in an
  ``lr_multipliers`` group are MUON (trained by :func:`muon`).
  """
  freeze_res = [re.compile(p) for p in freeze]
  mult_res = [re.compile(p) for p in (lr_multipliers or {})]
  def label(path, leaf):
    s = _path_str(path)
    if any(r.search(s) for r in freeze_res):
      return FROZEN
    for i, r in enumerate(mult_res):
      if r.search(s):
        return f"lr{i}"
    if muon and getattr(leaf, "ndim", 0) == 4:
      return MUON
    return DEFAULT
  return jax.tree_util.tree_map_with_path(label, params)


def muon_mask(params, config):
  """True for the parameters ``config`` trains with Muon (all False unless optimizer="muon")."""
  on = config.optimizer == "muon"
  labels = param_labels(params, freeze=config.freeze, lr_multipliers=config.lr_multipliers, muon=on)
  return jax.tree.map(lambda l: l == MUON, labels)


# ------------------------------------------------------------------ schedules
# Each schedule: fn(lr, options, *, steps_per_epoch, total_steps, warmup) -> optax schedule.


def _with_warmup(main, lr, warmup):
  if not warmup:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _onecycle(lr, o, *, steps_per_epoch, total_steps, warmup):
  return optax.cosine_onecycle_schedule(
      transition_steps=total_steps, peak_value=lr, pct_start=o["pct_start"],
      div_factor=o["div_factor"], final_div_factor=o["final_div_factor"])


def _triangle(lr, o, *, steps_per_epoch, total_steps, warmup):
  """airbench's: linear up from lr/div to lr at pct_start, linear down."""
  start = lr / o["div_factor"]
  peak_step = max(1, int(o["pct_start"] * total_steps))
  return optax.join_schedules(
      [optax.linear_schedule(start, lr, peak_step),
       optax.linear_schedule(lr, start / o["final_div_factor"], total_steps - peak_step)], [peak_step])


def _linear(lr, o, *, steps_per_epoch, total_steps, warmup):
  """airbench94_muon's: straight down to final_lr_fraction of the peak."""
  main = optax.linear_schedule(lr, lr * o["final_lr_fraction"], max(total_steps - warmup, 1))
  return _with_warmup(main, lr, warmup)


def _cosine(lr, o, *, steps_per_epoch, total_steps, warmup):
  if warmup:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
        end_value=lr * o["final_lr_fraction"])
  return optax.cosine_decay_schedule(lr, decay_steps=total_steps, alpha=o["final_lr_fraction"])


def _step(lr, o, *, steps_per_epoch, total_steps, warmup):
  """lr multiplied by decay_factor at each of decay_epochs."""
  boundaries = {int(round(e * steps_per_epoch)): o["decay_factor"] for e in o["decay_epochs"]}
  main = optax.piecewise_constant_schedule(lr, {b - warmup: f for b, f in boundaries.items() if b > warmup})
  return _with_warmup(main, lr, warmup)


def _constant(lr, o, *, steps_per_epoch, total_steps, warmup):
  return _with_warmup(optax.constant_schedule(lr), lr, warmup)


_ONECYCLE = {"pct_start": 0.25, "div_factor": 25.0, "final_div_factor": 1e4}
# name -> (default options, builder). Adding a schedule is one entry here.
SCHEDULES = {
    "cosine": ({"final_lr_fraction": 0.0}, _cosine),
    "onecycle": (_ONECYCLE, _onecycle),
    "triangle": (_ONECYCLE, _triangle),
    "linear": ({"final_lr_fraction": 0.0}, _linear),
    "step": ({"decay_epochs": (), "decay_factor": 0.1}, _step),
    "constant": ({}, _constant),
}


def _options(kind: str, table: dict, name: str, given: dict) -> dict:
  if name not in table:
    raise ValueError(f"{kind} must be one of {', '.join(table)}; got {name!r}")
  defaults = table[name][0]
  unknown = set(given or {}) - set(defaults)
  if unknown:
    raise ValueError(f"{kind} {name!r} has no option(s) {sorted(unknown)}; its options are "
                     f"{sorted(defaults) or 'none'}")
  return {**defaults, **(given or {})}


def schedule_options(config) -> dict:
  """``config.schedule_options`` over the schedule's defaults (ValueError on unknown names)."""
  return _options("schedule", SCHEDULES, config.schedule, config.schedule_options)


def make_schedule(config, *, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule named by ``config.schedule`` (peak ``config.learning_rate``,
  options ``config.schedule_options``, see :data:`SCHEDULES`)."""
  total_steps = max(int(total_steps), 1)
  warmup = min(int(round(config.warmup_epochs * steps_per_epoch)), total_steps - 1)
  builder = SCHEDULES[config.schedule][1] if config.schedule in SCHEDULES else None
  options = schedule_options(config)
  return builder(config.learning_rate, options, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, warmup=warmup)


# ------------------------------------------------------------------ optimizers
# Each optimizer: fn(learning_rate, options, *, weight_decay, mask) -> GradientTransformation,
# weight decay decoupled (lr-scaled, after momentum) when weight_decay > 0.


def _decoupled(parts, learning_rate, weight_decay, mask):
  """SGDW-style: lr * wd * w is added after momentum, not folded into it."""
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay, mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def _sgd(learning_rate, o, *, weight_decay, mask):
  parts = [optax.trace(decay=o["momentum"], nesterov=o["nesterov"])] if o["momentum"] else []
  return _decoupled(parts, learning_rate, weight_decay, mask)


def _rmsprop(learning_rate, o, *, weight_decay, mask):
  parts = [optax.scale_by_rms(decay=o["decay"], eps=o["eps"])]
  if o["momentum"]:
    parts.append(optax.trace(decay=o["momentum"], nesterov=o["nesterov"]))
  return _decoupled(parts, learning_rate, weight_decay, mask)


def _adamw(learning_rate, o, *, weight_decay, mask):
  return optax.adamw(learning_rate, b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=weight_decay, mask=mask)


def _lamb(learning_rate, o, *, weight_decay, mask):
  return optax.lamb(learning_rate, b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=weight_decay, mask=mask)


_ADAM = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}
# name -> (default options, builder). Adding an optimizer is one entry here. "muon" trains the
# conv kernels with :func:`muon` and every other parameter with its "fallback" optimizer.
OPTIMIZERS = {
    "sgd": ({"momentum": 0.9, "nesterov": True}, _sgd),
    "adamw": (_ADAM, _adamw),
    "rmsprop": ({"decay": 0.9, "eps": 1e-8, "momentum": 0.9, "nesterov": True}, _rmsprop),
    "lamb": (_ADAM, _lamb),
    "muon": ({"learning_rate": 0.02, "momentum": 0.95, "nesterov": True, "ns_steps": 5,
              "normalize_weights": False, "fallback": "sgd", "fallback_options": {}}, None),
}


def optimizer_options(config) -> dict:
  """``config.optimizer_options`` over the optimizer's defaults (ValueError on unknown names);
  for muon, ``fallback_options`` over the fallback's defaults."""
  options = _options("optimizer", OPTIMIZERS, config.optimizer, config.optimizer_options)
  if config.optimizer == "muon":
    if options["fallback"] == "muon" or options["fallback"] not in OPTIMIZERS:
      raise ValueError(f"muon fallback must be one of {[n for n in OPTIMIZERS if n != 'muon']}, "
                       f"got {options['fallback']!r}")
    options["fallback_options"] = _options("optimizer", OPTIMIZERS, options["fallback"],
                                           options["fallback_options"])
  return options


def _base_optimizer(config, learning_rate, mask) -> optax.GradientTransformation:
  """One optimizer for one parameter group, with decoupled weight decay if asked."""
  wd = config.weight_decay if config.weight_decay_mode == "decoupled" else 0.0
  name, options = config.optimizer, optimizer_options(config)
  if name == "muon":  # the parameters Muon does not take (biases, norms, dense heads)
    name, options = options["fallback"], options["fallback_options"]
  return OPTIMIZERS[name][1](learning_rate, options, weight_decay=wd, mask=mask)


def make_optimizer(config, *, steps_per_epoch: int, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule) for a Config: optimizer, schedule, decay mask, clipping, groups, freezing.

  Frozen parameters (``config.freeze``) get ``optax.set_to_zero`` and no optimizer state;
  each ``lr_multipliers`` pattern gets its own group whose schedule is scaled. With
  ``optimizer="muon"`` the remaining convolution kernels train with :func:`muon` (peak rate
  ``optimizer_options["learning_rate"]``, same schedule shape) and everything else with the
  ``fallback`` optimizer. ``group_epochs`` squeezes a group's whole schedule into its first N epochs.
  """
  schedule = make_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  mask: Callable = lambda p: decay_mask(p, decay_bn_and_bias=config.decay_bn_and_bias,
                                        exclude=muon_mask(p, config))
  is_muon = config.optimizer == "muon"
  multipliers = list((config.lr_multipliers or {}).values())
  patterns = list(config.lr_multipliers or {})
  short = dict(config.group_epochs or {})
  unknown = set(short) - set(patterns)
  if unknown:
    raise ValueError(f"group_epochs patterns {sorted(unknown)} must also be lr_multipliers keys "
                     f"(use 1.0 to keep the rate); got lr_multipliers {patterns}")
  grouped = bool(config.freeze or multipliers or is_muon)
  if not grouped:
    tx = _base_optimizer(config, schedule, mask)
  else:
    transforms = {FROZEN: optax.set_to_zero(), DEFAULT: _base_optimizer(config, schedule, mask)}
    for i, (p, m) in enumerate(zip(patterns, multipliers)):
      group = _scaled(schedule, float(m))
      if p in short:
        group = _squeezed(group, total_steps, int(round(short[p] * steps_per_epoch)))
      transforms[f"lr{i}"] = _base_optimizer(config, group, mask)
    if is_muon:
      o = optimizer_options(config)
      transforms[MUON] = muon(
          _scaled(schedule, o["learning_rate"] / config.learning_rate),
          momentum=o["momentum"], nesterov=o["nesterov"], ns_steps=o["ns_steps"],
          normalize_weights=o["normalize_weights"],
          weight_decay=config.weight_decay if config.weight_decay_mode == "decoupled" else 0.0)
    labels = lambda p: param_labels(p, freeze=config.freeze, lr_multipliers=config.lr_multipliers,
                                    muon=is_muon)
    tx = optax.partition(transforms, labels)
  if config.grad_clip_norm:
    prefix = []
    if config.freeze:  # frozen gradients must not count in the clipping norm
      frozen = lambda p: jax.tree.map(lambda l: l == FROZEN, param_labels(p, freeze=config.freeze))
      prefix.append(optax.masked(optax.set_to_zero(), frozen))
    tx = optax.chain(*prefix, optax.clip_by_global_norm(config.grad_clip_norm), tx)
  from jcv.train.config import lookahead_options
  ahead = lookahead_options(config)
  if ahead["every"]:
    tx = lookahead(tx, sync_every=ahead["every"], total_steps=total_steps, decay=ahead["decay"],
                   power=ahead["power"])
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


def _squeezed(schedule, total_steps: int, group_steps: int):
  """``schedule`` run over the first ``group_steps`` steps instead of ``total_steps``, then 0."""
  group_steps = max(int(group_steps), 1)
  ratio = max(int(total_steps), 1) / group_steps
  return lambda step: jnp.where(step < group_steps, schedule(jnp.floor(step * ratio)), 0.0)


# Quintic Newton-Schulz coefficients of Jordan et al.'s Muon (slope at zero maximised).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: jax.Array, steps: int = 5, eps: float = 1e-7) -> jax.Array:
  """Approximately orthogonalises a matrix ``g`` [m, n]: ~ U S' V^T with S' in about (0.5, 1.5)
  for g = U S V^T (Muon's quintic iteration, in float32)."""
  if g.ndim != 2:
    raise ValueError(f"newton_schulz needs a matrix, got shape {g.shape}")
  a, b, c = _NS_COEFFS
  x = g.astype(jnp.float32)
  x = x / (jnp.linalg.norm(x) + eps)  # top singular value <= 1
  wide = x.shape[0] <= x.shape[1]
  if not wide:
    x = x.T
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x if wide else x.T


class MuonState(NamedTuple):
  """State of :func:`muon`: the momentum buffer and the step count."""
  momentum: optax.Updates
  count: jax.Array


def muon(learning_rate, *, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
         normalize_weights: bool = False, weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Muon (Jordan et al. 2024): momentum SGD whose update is orthogonalised per kernel.

  For a convolution kernel [kh, kw, cin, cout] the momentum (Nesterov if asked) is viewed as a
  ``cout x (kh kw cin)`` matrix and replaced by :func:`newton_schulz` of it; the step is
  ``-lr * that``. ``normalize_weights`` (airbench94_muon) first rescales each kernel to
  Frobenius norm ``sqrt(cout)``, for networks where BatchNorm makes the scale irrelevant;
  ``weight_decay`` multiplies the kernel by ``1 - lr * wd`` (decoupled). ``learning_rate``:
  a float or an optax schedule. Needs ``params`` in ``update``.
  """
  lr_fn = learning_rate if callable(learning_rate) else (lambda _: learning_rate)

  def init(params):
    return MuonState(jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.int32))

  def update(grads, state, params=None):
    if params is None:
      raise ValueError("muon needs params in update()")
    lr = lr_fn(state.count)
    buf = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, grads)
    direction = (jax.tree.map(lambda g, m: g + momentum * m, grads, buf) if nesterov else buf)

    def step(d, p):
      if d.ndim < 2:
        raise ValueError(f"muon trains matrices and kernels only, got a parameter of shape {d.shape}")
      cout = d.shape[-1]
      ortho = newton_schulz(d.reshape(-1, cout).T, ns_steps).T.reshape(d.shape)
      p32 = p.astype(jnp.float32)
      new = p32
      if normalize_weights:
        new = new * (jnp.sqrt(float(cout)) / (jnp.linalg.norm(new) + 1e-12))
      if weight_decay:
        new = new * (1 - lr * weight_decay)
      new = new - lr * ortho
      return (new - p32).astype(p.dtype)
    return jax.tree.map(step, direction, params), MuonState(buf, state.count + 1)

  return optax.GradientTransformation(init, update)
