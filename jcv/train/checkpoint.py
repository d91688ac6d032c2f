"""Orbax checkpoints of a run: TrainState + data-iterator state + config, in one step folder.

Uses ``orbax.checkpoint.CheckpointManager`` with a preservation policy (keep the last k and
the best by an eval metric) and asynchronous saves. Orbax writes each step to a temporary
folder and renames it when complete, so a run killed mid-save leaves a temporary folder
that is ignored (with a warning); a step that fails to restore is skipped for the previous one.
"""
from __future__ import annotations

import base64
import logging
import pathlib
import warnings

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

__all__ = ["RunCheckpointer"]

_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "key")
log = logging.getLogger(__name__)


class _QuietMissingMetrics(logging.Filter):
  """Orbax warns on every save without metrics; mid-epoch saves have none by design."""

  def filter(self, record):
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_QuietMissingMetrics())


def _state_tree(state) -> dict:
  return {f: getattr(state, f) for f in _STATE_FIELDS}


def _encode(data):
  """Iterator states may be bytes; JSON needs text."""
  if isinstance(data, bytes):
    return {"__bytes__": base64.b64encode(data).decode("ascii")}
  return data


def _decode(data):
  if isinstance(data, dict) and set(data) == {"__bytes__"}:
    return base64.b64decode(data["__bytes__"])
  return data


class RunCheckpointer:
  """Saves and restores a run's checkpoints under ``directory``.

  ``keep`` most recent steps are kept, plus the best one by ``best_metric`` among steps
  saved with metrics (``best_mode`` "max" or "min"). Saves are asynchronous; call ``wait()``
  before reading them and ``close()`` at the end.
  """

  def __init__(self, directory, *, keep: int = 2, best_metric: str = "top1", best_mode: str = "max",
               async_save: bool = True):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric, self.best_mode = best_metric, best_mode
    self._warn_partial()
    policy = ocm.AnyPreservationPolicy([
        ocm.LatestN(n=keep),
        ocm.BestN(get_metric_fn=lambda m: float(m[best_metric]), reverse=best_mode == "min", n=1,
                  keep_checkpoints_without_metrics=False),
    ])
    # best_fn/best_mode make Orbax write the metrics; the policy alone decides what is kept.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=lambda m: float(m[best_metric]), best_mode=best_mode, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    try:
      self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                        item_names=("state", "data", "config"))
    except Exception as e:  # noqa: BLE001 - damaged metadata of a step: say where, never start over
      from jcv.train.rundir import ResumeError
      raise ResumeError(
          f"the checkpoints in {self.directory} cannot be read ({type(e).__name__}: {e}); they are "
          "damaged, so none can be restored. Use another --workdir, or --restart to move the run "
          "aside (nothing is deleted)") from e

  def _warn_partial(self):
    if not self.directory.is_dir():
      return
    for p in sorted(self.directory.iterdir()):
      if p.is_dir() and "tmp" in p.name:
        warnings.warn(f"ignoring half-written checkpoint {p} (the run stopped while saving it)",
                      stacklevel=3)

  def save(self, state, *, data_state=None, config: dict | None = None, metrics: dict | None = None,
           force: bool = True) -> bool:
    """Starts an asynchronous save of ``state`` at ``state.step`` (metrics rank the best)."""
    step = int(jax.device_get(state.step))
    if step in self._mgr.all_steps():
      return False
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)),
        data=ocp.args.JsonSave(_encode(data_state)),
        config=ocp.args.JsonSave(config or {}))
    clean = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    return self._mgr.save(step, args=args, metrics=clean, force=force)

  def all_steps(self) -> list[int]:
    """Completed checkpoint steps, ascending."""
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    """The newest completed step, or None."""
    return self._mgr.latest_step()

  def best_step(self) -> int | None:
    """The step with the best ``best_metric``; the latest step if none has metrics."""
    scored = []
    for s in self.all_steps():
      m = self._mgr.metrics(s)
      if m and self.best_metric in m:
        scored.append((float(m[self.best_metric]), s))
    if not scored:
      return self.latest_step()
    pick = max if self.best_mode == "max" else min
    return pick(scored)[1]

  def restore(self, state, *, step: int | None = None):
    """(state, data_state, config_dict, step) from ``step`` (default: newest that restores), or None.

    ``state`` gives the structure, dtypes and shardings to restore into.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_tree(state))
    for s in steps:
      try:
        out = self._mgr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
      except Exception as e:  # a damaged step: fall back to the previous one
        if step is not None:
          raise
        warnings.warn(f"checkpoint step {s} in {self.directory} could not be restored ({e!r}); "
                      "trying the previous one", stacklevel=2)
        continue
      return state.replace(**out["state"]), _decode(out["data"]), out["config"], s
    return None

  def restore_config(self, *, step: int | None = None) -> dict | None:
    """Only the saved config dict of ``step`` (default latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return out["config"]

  def wait(self):
    """Blocks until pending asynchronous saves are on disk."""
    self._mgr.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases Orbax's resources."""
    self._mgr.wait_until_finished()
    self._mgr.close()
