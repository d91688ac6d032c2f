"""Optax transformations jcv adds: airbench's lookahead, Muon (orthogonalised momentum), and the
rate factor of a plateau schedule."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["lookahead", "LookaheadState", "muon", "MuonState", "newton_schulz", "PlateauState", "plateau_scale",
           "observe_plateau", "map_plateau", "plateau_factor"]


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


class PlateauState(NamedTuple):
  """State of :func:`plateau_scale`: the rate factor and what decides its next cut."""
  scale: jax.Array      # multiplies every update
  best: jax.Array       # best metric seen
  bad: jax.Array        # evaluations since the last improvement
  cooldown: jax.Array   # evaluations left without a cut


def plateau_scale(*, higher_is_better: bool) -> optax.GradientTransformation:
  """Multiplies the updates by a factor that :func:`observe_plateau` lowers when the
  evaluation metric stalls (Keras' ReduceLROnPlateau). The state lives in the optimizer
  state, so it is checkpointed with it and a resumed run continues exactly."""
  def init(params):
    del params
    worst = -jnp.inf if higher_is_better else jnp.inf
    return PlateauState(jnp.ones([], jnp.float32), jnp.asarray(worst, jnp.float32), jnp.zeros([], jnp.int32),
                        jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u: (u * state.scale).astype(u.dtype), updates), state

  return optax.GradientTransformation(init, update)


def observe_plateau(state: PlateauState, metric: float, *, factor: float, patience: int, min_delta: float,
                    cooldown: int, min_scale: float, higher_is_better: bool) -> PlateauState:
  """The state after one evaluation with ``metric`` (host side, in numpy)."""
  import numpy as np
  scale, best, bad, wait = (np.asarray(x).item() for x in state)
  gain = (metric - best) if higher_is_better else (best - metric)
  if gain > min_delta:
    best, bad = metric, 0
  else:
    bad += 1
  if wait > 0:
    wait, bad = wait - 1, 0
  elif bad >= patience:
    scale, bad, wait = max(scale * factor, min_scale), 0, cooldown
  return PlateauState(np.float32(scale), np.float32(best), np.int32(bad), np.int32(wait))


def map_plateau(opt_state, fn):
  """``opt_state`` with ``fn(state)`` in place of every PlateauState in it."""
  return jax.tree.map(lambda s: fn(s) if isinstance(s, PlateauState) else s, opt_state,
                      is_leaf=lambda s: isinstance(s, PlateauState))


def plateau_factor(opt_state):
  """The plateau factor held in ``opt_state`` (1.0 without one)."""
  found = [s.scale for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, PlateauState))
           if isinstance(s, PlateauState)]
  return found[0] if found else jnp.ones([], jnp.float32)
