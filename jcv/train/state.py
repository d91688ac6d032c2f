"""TrainState: everything that changes during training, as one pytree."""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

__all__ = ["TrainState", "create_train_state", "init_variables", "raw_key"]


class TrainState(flax.struct.PyTreeNode):
  """step, params, batch_stats, opt_state and the run's PRNG key; apply_fn and tx are static."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array  # raw uint32[2] key data, so checkpoints hold a plain array
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads, *, batch_stats=None) -> "TrainState":
    """One optimizer update; ``batch_stats`` replaces the running statistics when given."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(
        step=self.step + 1, params=params, opt_state=opt_state,
        batch_stats=self.batch_stats if batch_stats is None else batch_stats)

  @property
  def variables(self) -> dict:
    """The ``variables`` dict for ``model.apply``."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def raw_key(key) -> jax.Array:
  """uint32 key data for a typed (``jax.random.key``) or raw (``PRNGKey``) key."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  return jnp.asarray(key, jnp.uint32)


def _init(model, input_shape, key):
  init_key, dropout_key, run_key = jax.random.split(key, 3)
  variables = model.init({"params": init_key, "dropout": dropout_key},
                         jnp.zeros(input_shape, jnp.float32), train=False)
  return dict(variables), run_key


def init_variables(key, model, input_shape) -> dict:
  """The variables ``create_train_state(key, model, ...)`` starts from (same key, same values)."""
  variables, _ = jax.jit(lambda k: _init(model, tuple(input_shape), k))(raw_key(key))
  return variables


def create_train_state(key, model, tx: optax.GradientTransformation, input_shape, *,
                       variables: dict | None = None) -> TrainState:
  """Initialises the model on zeros of ``input_shape`` (NHWC) and the optimizer state.

  ``key`` seeds both the parameter init and the run's key (used by train_step for
  augmentation and dropout, folded with the step number). ``variables`` (e.g. pretrained
  weights, see ``Config.init``) replace the model's random init; the run's key is the same.
  """
  if variables is None and len(input_shape) != 4:
    raise ValueError(f"input_shape must be NHWC (4 numbers), got {tuple(input_shape)}")
  input_shape = tuple(input_shape)

  def init(key, given):
    if given is None:
      variables, run_key = _init(model, input_shape, key)
    else:
      variables, run_key = given, jax.random.split(key, 3)[2]
    params = variables["params"]
    return params, variables.get("batch_stats", {}), tx.init(params), run_key

  # One compiled program instead of hundreds of small eager ops.
  given = None if variables is None else jax.tree.map(jnp.asarray, dict(variables))
  params, batch_stats, opt_state, run_key = jax.jit(init)(raw_key(key), given)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=opt_state, key=run_key, apply_fn=model.apply, tx=tx)
