"""A work directory belongs to one run: an exclusive lock, an explicit resume, ``--restart``.

* :class:`WorkdirLock`: ``<workdir>/.lock`` held with ``flock`` for the life of the run (the
  kernel drops it when the process dies, even by SIGKILL); the file names the holder (pid,
  host, command). A second run on the workdir fails at once naming it; a lock file left by a
  dead process is taken over with a note.
* :func:`resume`: before restoring, the run's structure (parameter shapes, classes, schedule
  length, structural config fields) is compared with ``<workdir>/run.json`` written by the
  run that made the checkpoints. A difference refuses, naming it and the two ways out;
  other config changes warn. Checkpoints that exist but none restores refuse too: a run never
  starts over on top of another run's checkpoints.
* :func:`move_aside` (``--restart``): the old run's files go to ``<workdir>.old-<time>``,
  never deleted.
* :func:`owns_workdir`: the decorator ``jcv.train.fit`` wears for the lock and ``restart=``.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import os
import pathlib
import socket
import sys
import time
import warnings

from jcv import safefile

__all__ = ["RunDirError", "WorkdirLockedError", "ResumeError", "WorkdirLock", "owns_workdir",
           "move_aside", "restart_run", "describe", "resume", "structural_differences"]

LOCK_NAME = ".lock"
RUN_FILE = "run.json"

# Config fields (dotted paths) whose change makes a checkpoint another run's: refused on resume.
STRUCTURAL = frozenset({
    "model.name", "model.options", "model.num_classes", "model.dtype", "data.image_size", "data.batch_size",
    "data.dataset", "data.train_split", "data.val_fraction", "data.crop", "run.seed", "optim.name",
    "optim.freeze", "optim.lr_multipliers", "optim.group_lengths", "optim.lookahead.every"})
# Fields that only change how a run is watched or run, not what it computes: no warning.
OPERATIONAL = frozenset({
    "run.progress", "run.plots", "data.num_workers", "run.compilation_cache", "run.max_steps_in_flight",
    "data.data_dir", "run.length", "format"})  # run.length: compared as the schedule length (total steps)

WAYS_OUT = ("use another --workdir, or pass --restart (fit(..., restart=True)) to move the old "
            "run aside to {aside} and start afresh (nothing is deleted)")


class RunDirError(ValueError):
  """A work directory cannot be used as asked; the message says why and what to do."""


class WorkdirLockedError(RunDirError):
  """Another live run holds the work directory."""


class ResumeError(RunDirError):
  """The checkpoints in the work directory belong to another run, or none restores."""


# ------------------------------------------------------------------ lock


def _holder_text(info: dict) -> str:
  if not info:
    return "an unknown process"
  cmd = " ".join(info.get("argv", []))[:200]
  return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"
          + (f" ({cmd})" if cmd else ""))


class WorkdirLock:
  """Exclusive lock of ``workdir`` for this process (a context manager; re-entrant no)."""

  def __init__(self, workdir):
    self.workdir = pathlib.Path(workdir).absolute()
    self.path = self.workdir / LOCK_NAME
    self._fd = None
    self.stale: dict | None = None  # the dead holder whose lock file was taken over

  def _read(self, fd) -> dict:
    try:
      os.lseek(fd, 0, os.SEEK_SET)
      text = os.read(fd, 65536).decode("utf-8", "replace").strip()
      return json.loads(text) if text else {}
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = safefile.open_fd(self.path, os.O_RDWR | os.O_CREAT)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read(fd)
      os.close(fd)
      raise WorkdirLockedError(
          f"work directory {self.workdir} is in use by another run: {_holder_text(holder)}; wait "
          "for it to finish (or stop it), or use another --workdir") from None
    except OSError as e:  # no flock on this filesystem: fall back to the pid in the file
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
        os.close(fd)
        raise
      holder = self._read(fd)
      if (holder.get("pid") and holder.get("host") == socket.gethostname()
          and holder["pid"] != os.getpid() and safefile.pid_alive(int(holder["pid"]))):
        os.close(fd)
        raise WorkdirLockedError(f"work directory {self.workdir} is in use by another run: "
                                 f"{_holder_text(holder)}; use another --workdir") from None
    previous = self._read(fd)
    if previous.get("pid"):  # written by a run that died without releasing it
      self.stale = previous
      print(f"note: taking over the stale lock of {self.workdir} left by a process that is no "
            f"longer running ({_holder_text(previous)})", file=sys.stderr)
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": list(sys.argv)}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    """Empties the lock file (kept: unlinking a flock'ed file races) and unlocks it."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _entries(workdir: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in workdir.iterdir() if p.name != LOCK_NAME] if workdir.is_dir() else []


def move_aside(workdir) -> pathlib.Path | None:
  """Moves everything in the jcv run folder ``workdir`` but the lock to a new
  ``<workdir>.old-<time>`` folder; a folder that is not a jcv run is refused, untouched."""
  workdir = pathlib.Path(workdir).absolute()
  entries = _entries(workdir)
  if not entries:
    return None
  _check_restartable(workdir)
  aside = _aside_name(workdir)
  aside.mkdir(parents=True)
  for p in entries:
    os.replace(p, aside / p.name)
  print(f"--restart: moved the previous run in {workdir} to {aside}", file=sys.stderr)
  return aside


def _check_restartable(workdir: pathlib.Path) -> None:
  if _entries(workdir) and not safefile.is_run_folder(workdir):
    raise RunDirError(f"--restart: {workdir} is not a jcv run folder (it has no {safefile.RUN_MARKER} "
                      "file), so nothing was moved; pass the --workdir of a jcv run, or a new folder")


def _aside_name(workdir: pathlib.Path) -> pathlib.Path:
  stamp = time.strftime("%Y%m%d-%H%M%S")
  aside, n = workdir.with_name(f"{workdir.name}.old-{stamp}"), 1
  while aside.exists():
    n += 1
    aside = workdir.with_name(f"{workdir.name}.old-{stamp}-{n}")
  return aside


def restart_run(workdir) -> None:
  """``--restart`` once every argument has been checked: process 0 moves the old run aside
  (:func:`move_aside`) and marks the folder a new run; the other processes wait for it."""
  import jax
  workdir = pathlib.Path(workdir).absolute()
  if jax.process_index() == 0:
    move_aside(workdir)
    safefile.mark_run_folder(workdir)
  if jax.process_count() > 1:
    import orbax.checkpoint as ocp
    ocp.multihost.sync_global_processes("jcv_restart", timeout=600)


def owns_workdir(fit):
  """Decorates ``fit(config, *, workdir, restart, ...)``: the workdir is locked for the call
  (process 0 of a multi-host run holds it). A new or empty folder is marked a jcv run
  (:data:`jcv.safefile.RUN_MARKER`); ``restart=True`` on a folder that is not a jcv run is
  refused before anything else, and ``fit`` calls :func:`restart_run` once its arguments
  are checked."""

  @functools.wraps(fit)
  def wrapper(config, *, workdir, restart: bool = False, **kwargs):
    import jax
    workdir = pathlib.Path(workdir).absolute()
    main = jax.process_index() == 0
    if main and restart:  # before the lock: nothing is created in a folder that is not a run
      _check_restartable(workdir)
    with WorkdirLock(workdir) if main else contextlib.nullcontext():
      if main and not _entries(workdir):
        safefile.mark_run_folder(workdir)
      return fit(config, workdir=workdir, restart=restart, **kwargs)

  return wrapper


# ------------------------------------------------------------------ resume


def _flatten(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and k not in (
        "options", "lr_multipliers", "group_lengths"):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def describe(config, *, class_names, num_classes: int, total_steps: int, steps_per_epoch: int,
             state) -> dict:
  """What a run's checkpoints are made of (written to ``run.json``)."""
  import jax
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      {"params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}):
    if hasattr(leaf, "shape"):
      shapes[jax.tree_util.keystr(path)] = f"{leaf.dtype}{list(leaf.shape)}"
  return {"config": config.to_dict(), "class_names": list(class_names), "num_classes": int(num_classes),
          "total_steps": int(total_steps), "steps_per_epoch": int(steps_per_epoch), "state": shapes}


def _short(v) -> str:
  text = json.dumps(v) if not isinstance(v, str) else repr(v)
  return text if len(text) <= 80 else text[:77] + "..."


def structural_differences(saved: dict, current: dict) -> tuple[list[str], list[str]]:
  """(refusing differences, warned differences) between two :func:`describe` records."""
  saved_config = saved.get("config") or {}
  if saved_config and saved_config.get("format") != current["config"].get("format"):
    from jcv.train.config import Config
    try:
      Config.from_dict(saved_config)  # another layout: refused with the version that wrote it
    except ValueError as e:
      return [str(e)], []
  refuse, warn = [], []
  if saved.get("total_steps") not in (None, current["total_steps"]):
    refuse.append(f"schedule length {saved['total_steps']} -> {current['total_steps']} steps "
                  "(--steps/--epochs; the learning-rate schedule would be re-laid)")
  if None not in (saved.get("steps_per_epoch"), current.get("steps_per_epoch")) and (
      saved["steps_per_epoch"] != current["steps_per_epoch"]):
    refuse.append(f"steps per epoch {saved['steps_per_epoch']} -> {current['steps_per_epoch']} "
                  "(the training data or batch size changed)")
  old_names, new_names = saved.get("class_names"), current["class_names"]
  if old_names is not None and old_names and new_names and old_names != new_names:
    refuse.append(f"classes {_short(old_names)} -> {_short(new_names)}")
  elif saved.get("num_classes") not in (None, current["num_classes"]):
    refuse.append(f"num_classes {saved['num_classes']} -> {current['num_classes']}")
  a, b = _flatten(saved.get("config", {})), _flatten(current["config"])
  for key in sorted(set(a) | set(b)):
    if a.get(key) == b.get(key) or key not in a or key not in b:
      continue
    if key in OPERATIONAL:
      continue
    text = f"{key} {_short(a[key])} -> {_short(b[key])}"
    (refuse if key in STRUCTURAL else warn).append(text)
  old_state, new_state = saved.get("state"), current["state"]
  if old_state:
    changed = [k for k in sorted(set(old_state) | set(new_state)) if old_state.get(k) != new_state.get(k)]
    model_only = [k for k in changed if not k.startswith("['opt_state']")]
    changed = model_only or changed  # the optimizer state follows the parameters: name those
    if changed:
      shown = ", ".join(f"{k}: {old_state.get(k, 'absent')} -> {new_state.get(k, 'absent')}"
                        for k in changed[:4])
      refuse.append(f"{'model' if model_only else 'optimizer'} state ({len(changed)} arrays differ: {shown}"
                    + (", ..." if len(changed) > 4 else "") + ")")
  return refuse, warn


def _saved_record(workdir: pathlib.Path, checkpointer) -> dict:
  """run.json, or when it is unreadable: the checkpoint's config + class_names.json."""
  run_file = workdir / RUN_FILE
  if run_file.exists():
    try:
      return json.loads(run_file.read_text())
    except ValueError:
      pass
  record = {}
  for path, key in ((workdir / "config.json", "config"), (workdir / "class_names.json", "class_names")):
    try:
      record[key] = json.loads(path.read_text())
    except (OSError, ValueError):
      pass
  if "config" not in record:
    try:
      record["config"] = checkpointer.restore_config() or {}
    except Exception:  # noqa: BLE001 - a damaged checkpoint: compare what there is
      pass
  return record


def resume(checkpointer, state, *, workdir, current: dict, is_main: bool = True):
  """Restores the newest checkpoint of ``workdir`` into ``state`` after checking it belongs
  to this run (``current``: :func:`describe` of this run); None for a fresh run.

  Raises :class:`ResumeError` on a structural difference or when checkpoints exist but none
  restores; warns about other config changes; prints "resuming from step N of M in WORKDIR".
  """
  workdir = pathlib.Path(workdir)
  steps = checkpointer.all_steps()
  ways = WAYS_OUT.format(aside=f"{workdir}.old-<time>")
  if (workdir / RUN_FILE).exists() or steps:
    saved = _saved_record(workdir, checkpointer)
    refuse, warn = structural_differences(saved, current)
    if refuse:
      held = f"checkpoints (steps {steps})" if steps else "the start of a run (no checkpoint yet)"
      raise ResumeError(f"{workdir} holds {held} of a different run: " + "; ".join(refuse)
                        + f". To keep both, {ways}")
    if warn and steps:
      warnings.warn(f"resuming {workdir} with config changes (applied from here on): "
                    + "; ".join(warn), stacklevel=3)
  if not steps:
    if is_main:
      _write_json(workdir / RUN_FILE, current)
    return None
  restored = checkpointer.restore(state)
  if restored is None:
    raise ResumeError(f"checkpoints exist in {checkpointer.directory} (steps {steps}) but none "
                      f"restores (see the warnings above): refusing to start over on top of them. "
                      f"To start afresh, {ways}")
  step = int(restored[3])
  if is_main:
    print(f"resuming from step {step} of {current['total_steps']} in {workdir}", file=sys.stderr)
    if not (workdir / RUN_FILE).exists():
      _write_json(workdir / RUN_FILE, current)
  return restored


def _write_json(path, obj):
  safefile.write_json(path, obj, indent=1)
