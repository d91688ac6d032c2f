"""Optax optimizers, schedules, weight-decay masks and parameter groups from a Config.

Parameter paths are "/"-joined names, e.g. ``"Conv_0/kernel"`` or
``"backbone/block_3/BatchNorm_0/scale"``; ``freeze`` and ``lr_multipliers`` match them
with ``re.search``.
"""
from __future__ import annotations

import re
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jcv.train import durations, optax_extras

__all__ = [
    "param_paths", "decay_mask", "param_labels", "make_schedule", "make_optimizer", "muon_mask", "FROZEN",
    "DEFAULT", "MUON", "OPTIMIZERS", "SCHEDULES", "check_optimizer", "check_schedule",
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


def muon_mask(params, optim):
  """True for the parameters an ``Optim`` section trains with Muon (all False without ``muon``)."""
  on = optim.muon is not None
  labels = param_labels(params, freeze=optim.freeze, lr_multipliers=optim.lr_multipliers, muon=on)
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
  """lr multiplied by decay_factor at each duration of decay_at."""
  at = [durations.steps(d, steps_per_epoch=steps_per_epoch, batch_size=o["batch_size"]) for d in o["decay_at"]]
  boundaries = {b: o["decay_factor"] for b in at}
  main = optax.piecewise_constant_schedule(lr, {b - warmup: f for b, f in boundaries.items() if b > warmup})
  return _with_warmup(main, lr, warmup)


def _constant(lr, o, *, steps_per_epoch, total_steps, warmup):
  return _with_warmup(optax.constant_schedule(lr), lr, warmup)


_ONECYCLE = ("pct_start", "div_factor", "final_div_factor")
# name -> (the Schedule section's fields it reads, builder). Adding a schedule is one entry here.
SCHEDULES = {
    "cosine": (("final_lr_fraction",), _cosine),
    "onecycle": (_ONECYCLE, _onecycle),
    "triangle": (_ONECYCLE, _triangle),
    "linear": (("final_lr_fraction",), _linear),
    "step": (("decay_at", "decay_factor"), _step),
    "constant": ((), _constant),
}


def _check_options(kind: str, table: dict, section, owners_of) -> None:
  """ValueError if ``section.name`` is not in ``table`` or a field another entry reads was
  changed from its default (it would be ignored)."""
  if section.name not in table:
    raise ValueError(f"{kind}.name must be one of {', '.join(table)}; got {section.name!r}")
  used = set(table[section.name][0])
  default = type(section)()
  for field in sorted({f for fields, _ in table.values() for f in fields} - used):
    if getattr(section, field) != getattr(default, field):
      raise ValueError(f"{kind}.{field} is an option of {', '.join(owners_of(field))}, not of "
                       f"{kind}.name={section.name!r}")


def check_schedule(schedule) -> None:
  """ValueError on an unknown schedule, or an option the named schedule does not read."""
  _check_options("schedule", SCHEDULES, schedule, lambda f: [n for n, (fs, _) in SCHEDULES.items() if f in fs])


def make_schedule(config, *, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of ``config.schedule`` (peak ``config.optim.learning_rate``)."""
  total_steps = max(int(total_steps), 1)
  s = config.schedule
  check_schedule(s)
  warmup = min(durations.steps(s.warmup, steps_per_epoch=steps_per_epoch, batch_size=config.data.batch_size),
               total_steps - 1)
  options = {f: getattr(s, f) for f in SCHEDULES[s.name][0]} | {"batch_size": config.data.batch_size}
  return SCHEDULES[s.name][1](config.optim.learning_rate, options, steps_per_epoch=steps_per_epoch,
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
  parts = [optax.scale_by_rms(decay=o["rms_decay"], eps=o["eps"])]
  if o["momentum"]:
    parts.append(optax.trace(decay=o["momentum"], nesterov=o["nesterov"]))
  return _decoupled(parts, learning_rate, weight_decay, mask)


def _adamw(learning_rate, o, *, weight_decay, mask):
  return optax.adamw(learning_rate, b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=weight_decay, mask=mask)


def _lamb(learning_rate, o, *, weight_decay, mask):
  return optax.lamb(learning_rate, b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=weight_decay, mask=mask)


_ADAM = ("b1", "b2", "eps")
# name -> (the Optim section's fields it reads, builder). Adding an optimizer is one entry here.
# With ``Optim.muon`` set, the conv kernels train with Muon and the rest with the named one.
OPTIMIZERS = {
    "sgd": (("momentum", "nesterov"), _sgd),
    "adamw": (_ADAM, _adamw),
    "rmsprop": (("rms_decay", "eps", "momentum", "nesterov"), _rmsprop),
    "lamb": (_ADAM, _lamb),
}


def check_optimizer(optim) -> None:
  """ValueError on an unknown optimizer, or an option the named optimizer does not read."""
  _check_options("optim", OPTIMIZERS, optim, lambda f: [n for n, (fs, _) in OPTIMIZERS.items() if f in fs])


def _base_optimizer(optim, learning_rate, mask) -> optax.GradientTransformation:
  """One optimizer for one parameter group, with decoupled weight decay if asked."""
  wd = optim.weight_decay if optim.weight_decay_mode == "decoupled" else 0.0
  fields, builder = OPTIMIZERS[optim.name]
  return builder(learning_rate, {f: getattr(optim, f) for f in fields}, weight_decay=wd, mask=mask)


def _groups(optim, schedule, mask, *, steps_per_epoch, total_steps, batch_size) -> dict:
  """The optimizer of each parameter label (frozen, default, lr<i>, muon)."""
  transforms = {FROZEN: optax.set_to_zero(), DEFAULT: _base_optimizer(optim, schedule, mask)}
  for i, (pattern, factor) in enumerate(optim.lr_multipliers.items()):
    group = _scaled(schedule, float(factor))
    if pattern in optim.group_lengths:
      group = _squeezed(group, total_steps, durations.steps(
          optim.group_lengths[pattern], steps_per_epoch=steps_per_epoch, batch_size=batch_size))
    transforms[f"lr{i}"] = _base_optimizer(optim, group, mask)
  if optim.muon is not None:
    m = optim.muon
    transforms[MUON] = optax_extras.muon(
        _scaled(schedule, m.learning_rate / optim.learning_rate), momentum=m.momentum, nesterov=m.nesterov,
        ns_steps=m.ns_steps, normalize_weights=m.normalize_weights,
        weight_decay=optim.weight_decay if optim.weight_decay_mode == "decoupled" else 0.0)
  return transforms


def make_optimizer(config, *, steps_per_epoch: int, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(tx, schedule) for a Config: optimizer, schedule, decay mask, clipping, groups, freezing.

  Frozen parameters (``optim.freeze``) get ``optax.set_to_zero`` and no optimizer state;
  each ``optim.lr_multipliers`` pattern gets its own group whose schedule is scaled (and
  squeezed into ``optim.group_lengths[pattern]``, then 0). With ``optim.muon`` the remaining
  convolution kernels train with Muon (its own peak rate, the same schedule shape).
  """
  optim = config.optim
  schedule = make_schedule(config, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  mask: Callable = lambda p: decay_mask(p, decay_bn_and_bias=optim.decay_bn_and_bias,
                                        exclude=muon_mask(p, optim))
  is_muon = optim.muon is not None
  if not (optim.freeze or optim.lr_multipliers or is_muon):
    tx = _base_optimizer(optim, schedule, mask)
  else:
    transforms = _groups(optim, schedule, mask, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                         batch_size=config.data.batch_size)
    labels = lambda p: param_labels(p, freeze=optim.freeze, lr_multipliers=optim.lr_multipliers, muon=is_muon)
    tx = optax.partition(transforms, labels)
  if optim.grad_clip_norm:
    prefix = []
    if optim.freeze:  # frozen gradients must not count in the clipping norm
      frozen = lambda p: jax.tree.map(lambda l: l == FROZEN, param_labels(p, freeze=optim.freeze))
      prefix.append(optax.masked(optax.set_to_zero(), frozen))
    tx = optax.chain(*prefix, optax.clip_by_global_norm(optim.grad_clip_norm), tx)
  if config.schedule.plateau is not None:
    tx = optax.chain(tx, optax_extras.plateau_scale(higher_is_better=config.evaluation.best_metric != "loss"))
  if optim.lookahead is not None:
    ahead = optim.lookahead
    tx = optax_extras.lookahead(tx, sync_every=ahead.every, total_steps=total_steps, decay=ahead.decay,
                                power=ahead.power)
  return tx, schedule


def _scaled(schedule, factor):
  return lambda step: schedule(step) * factor


def _squeezed(schedule, total_steps: int, group_steps: int):
  """``schedule`` run over the first ``group_steps`` steps instead of ``total_steps``, then 0."""
  group_steps = max(int(group_steps), 1)
  ratio = max(int(total_steps), 1) / group_steps
  return lambda step: jnp.where(step < group_steps, schedule(jnp.floor(step * ratio)), 0.0)
