"""Orbax checkpoints of a run: TrainState + data-iterator state + config, in one step folder.

Uses ``orbax.checkpoint.CheckpointManager`` with a preservation policy (keep the last k and
the best by an eval metric) and asynchronous saves. Orbax writes each step to a temporary
folder and renames it when complete, so a run killed mid-save leaves a temporary folder
that is ignored (with a warning); a step that fails to restore is skipped for the previous one,
and a writer sets such damaged steps aside (``checkpoints.damaged/``) so that retention never
counts them as the newest. Readers (``read_only=True``: evaluate, predict, load_run) never
write, clean, lock or delete anything: a run may be writing the folder while they read it.
A save that fails because the device is full (when it is written, or surfacing at the next
save, ``wait()`` or ``close()``) raises one :class:`~jcv.train.diskfull.DiskFullError`; the
previous checkpoint stays the newest on disk.
"""
from __future__ import annotations

import base64
import contextlib
import logging
import os
import pathlib
import time
import warnings

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

from jcv.train import diskfull

__all__ = ["RunCheckpointer"]

_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "key")
_STEP_FILES_BYTES = 256 * 1024  # a step folder's metadata files, beside the arrays (about 40 files)
log = logging.getLogger(__name__)


class _QuietMissingMetrics(logging.Filter):
  """Orbax warns on every save without metrics; mid-epoch saves have none by design."""

  def filter(self, record):
    text = record.getMessage()
    return not any(quiet in text for quiet in (
        "did not provide metrics", "Given directory is read only", "Metadata file does not exist"))


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


def _short(e: Exception) -> str:
  """The first line of an exception, at most 160 characters."""
  text = (str(e).strip().splitlines() or [""])[0]
  text = f"{type(e).__name__}: {text}"
  return text if len(text) <= 160 else text[:157] + "..."


def _while_steps_vanish(fn, tries: int = 5):
  """``fn()``, again while it fails on a step folder that a live run's retention deleted as Orbax
  listed the steps (FileNotFoundError)."""
  for attempt in range(tries):
    try:
      return fn()
    except FileNotFoundError:
      if attempt == tries - 1:
        raise
      time.sleep(0.1)


def _check_shapes(folder, abstract) -> None:
  """ValueError when the arrays saved in ``folder`` cannot be ``abstract``'s (another count or
  other shapes), raised before Orbax starts reading them: a restore that fails part-way leaves
  tensorstore reads whose callbacks print tracebacks against Orbax's closed event loop."""
  try:
    saved_tree = ocp.StandardCheckpointHandler().metadata(pathlib.Path(folder)).tree
  except Exception:  # noqa: BLE001 - no readable metadata: the restore says what is wrong
    return
  saved = sorted(tuple(getattr(x, "shape", None) or ()) for x in jax.tree.leaves(saved_tree))
  wanted = sorted(tuple(x.shape) for x in jax.tree.leaves(abstract))
  if saved != wanted:
    raise ValueError(f"the checkpoint's {len(saved)} arrays do not have the shapes of the "
                     f"{len(wanted)} this model and optimizer hold")


READ_PATIENCE_S = 120  # a reader of a live run keeps up with its retention this long


class RunCheckpointer:
  """Saves and restores a run's checkpoints under ``directory``.

  ``keep`` most recent steps are kept, plus the best one by ``best_metric`` among steps
  saved with metrics (``best_mode`` "max" or "min"). Saves are asynchronous; call ``wait()``
  before reading them and ``close()`` at the end. ``read_only=True`` opens the folder of a
  run that may be live for reading only (see :meth:`read`).
  """

  def __init__(self, directory, *, keep: int = 2, best_metric: str = "top1", best_mode: str = "max",
               async_save: bool = True, read_only: bool = False):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    self.directory = pathlib.Path(directory).absolute()
    self.best_metric, self.best_mode, self.read_only = best_metric, best_mode, read_only
    self._state_bytes = 0
    if read_only:
      self._mgr = self._open_read_only()
      return
    diskfull.quiet_background_errors()
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
    make = lambda: ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))
    try:
      try:
        self._mgr = make()
      except ValueError:  # a step whose metadata does not parse: set it aside, keep the others
        self._mgr = self._open_read_only()
        self._set_aside([s for s in self.all_steps() if not self._metrics_parse(s)])
        self._mgr.close()
        self._mgr = make()
    except Exception as e:  # noqa: BLE001 - damaged metadata of a step: say where, never start over
      from jcv.train.rundir import ResumeError
      raise ResumeError(
          f"the checkpoints in {self.directory} cannot be read ({type(e).__name__}: {e}); they are "
          "damaged, so none can be restored. Use another --workdir, or --restart to move the run "
          "aside (nothing is deleted)") from e

  def _open_read_only(self):
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, cleanup_tmp_directories=False,
                                           enable_async_checkpointing=False, save_interval_steps=0,
                                           lightweight_initialize=True)
    return _while_steps_vanish(
        lambda: ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config")))

  def _reload(self):
    _while_steps_vanish(self._mgr.reload)

  def _metrics_parse(self, step: int) -> bool:
    try:
      self._mgr.metrics(step)
      return True
    except ValueError:
      return False

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
    self._state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(_state_tree(state)) if hasattr(x, "nbytes"))
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)),
        data=ocp.args.JsonSave(_encode(data_state)),
        config=ocp.args.JsonSave(config or {}))
    clean = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    with self.full_disk_as_error():  # also the previous save's failure, which surfaces here
      return self._mgr.save(step, args=args, metrics=clean, force=force)

  def committed_step(self) -> int | None:
    """The newest step whose folder is complete on disk (a failed save is not one)."""
    steps = [int(p.name) for p in self.directory.iterdir() if p.name.isdigit()] if self.directory.is_dir() else []
    return max(steps, default=None)

  def disk_full_error(self, folder=None) -> diskfull.DiskFullError:
    """The error of a full device holding ``folder`` (default: the checkpoint folder): the space
    a checkpoint takes (the newest one on disk, else the state's bytes and the metadata files)
    and the step kept."""
    kept = self.committed_step()
    needed = (diskfull.folder_bytes(self.directory / str(kept)) if kept is not None
              else self._state_bytes + _STEP_FILES_BYTES)
    return diskfull.disk_full_error(folder or self.directory, needed=needed, kept_step=kept)

  @contextlib.contextmanager
  def full_disk_as_error(self, folder=None):
    """Turns an error caused by a full device into :meth:`disk_full_error` (others pass)."""
    try:
      yield
    except diskfull.DiskFullError:
      raise
    except Exception as e:
      if not diskfull.is_disk_full(e):
        raise
      raise self.disk_full_error(folder) from e

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
      try:
        m = self._mgr.metrics(s)
      except Exception:  # noqa: BLE001 - a damaged step has no usable metrics
        continue
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
    damaged = []
    for s in steps:
      try:
        _check_shapes(self.directory / str(s) / "state", abstract)
        out = self._mgr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore()))
      except Exception as e:  # a damaged step: fall back to the previous one
        if step is not None:
          raise
        warnings.warn(f"checkpoint step {s} in {self.directory} could not be restored ({_short(e)}); "
                      "trying the previous one", stacklevel=2)
        damaged.append(s)
        continue
      if damaged and not self.read_only:
        self._set_aside(damaged)
      return state.replace(**out["state"]), _decode(out["data"]), out["config"], s
    return None

  def _set_aside(self, steps):
    """Moves damaged step folders to ``<directory>.damaged/`` (nothing is deleted), so that
    the steps are saved anew and retention keeps the newest good one."""
    if not steps:
      return
    aside = self.directory.with_name(self.directory.name + ".damaged")
    aside.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for s in steps:
      os.replace(self.directory / str(s), aside / f"{s}-{stamp}")
    warnings.warn(f"moved the damaged checkpoint step(s) {steps} of {self.directory} to {aside}",
                  stacklevel=3)
    self._reload()

  def read(self, make_state, *, which: str = "best"):
    """(state, config dict, step) of the ``which`` ("best" or "latest") step for a reader.

    ``make_state(config_dict)`` gives the state to restore into. A step that does not read
    (damaged, or deleted by the live run's retention meanwhile) is passed over for the newest
    one that does, with one warning naming both; none: ValueError naming the folder."""
    failed, tried = [], set()
    deadline = time.monotonic() + READ_PATIENCE_S
    while time.monotonic() < deadline:  # a live run may have replaced every listed step: list them again
      steps = [s for s in self.all_steps() if s not in tried]
      if not steps:
        break
      first = self.best_step() if which == "best" else max(steps)
      first = first if first in steps else max(steps)
      for s in [first] + [t for t in reversed(steps) if t != first]:
        tried.add(s)
        try:
          config = self.restore_config(step=s)
          state = self.restore(make_state(config), step=s)[0]
        except Exception as e:  # noqa: BLE001 - any step that does not read: try the next newest
          failed.append((s, _short(e), os.path.isdir(self.directory / str(s))))
          continue
        damaged = [f for f in failed if f[2]]  # steps deleted meanwhile are no news
        if damaged:
          warnings.warn(f"checkpoint step {damaged[0][0]} in {self.directory} could not be read "
                        f"({damaged[0][1]}); using step {s}, the newest that reads")
        return state, config, s
      self._reload()
    if not failed:
      raise ValueError(f"no complete checkpoint in {self.directory}")
    raise ValueError(f"no checkpoint in {self.directory} can be read: "
                     + "; ".join(f"step {s} ({why})" for s, why, _ in failed[:3]))

  def restore_config(self, *, step: int | None = None) -> dict | None:
    """Only the saved config dict of ``step`` (default latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    out = self._mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return out["config"]

  def wait(self):
    """Blocks until pending asynchronous saves are on disk."""
    with self.full_disk_as_error():
      self._mgr.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases Orbax's resources (also when a save failed)."""
    try:
      self.wait()
    finally:
      with self.full_disk_as_error():
        self._mgr.close()
