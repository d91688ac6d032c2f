"""The flags every experiment script shares, and a ``run`` that turns them into ``fit``.

A script that is presets plus ``fit``::

  if __name__ == "__main__":
    jcv.train.cli.run(presets={"cpu": CPU, "gpu": GPU}, default_preset="cpu", description=__doc__)

(``fit_kwargs=`` passes sources or a model to ``fit``: a dict, or a function of the final
Config returning one). A script with its own options builds on the same parser::

  parser = cli.make_parser(__doc__, presets=RECIPES, default_workdir="runs/x")
  parser.add_argument("--variant", ...)
  args = parser.parse_args()
  cli.start(args)                                   # multi-host JAX, then CPU malloc tuning
  config = cli.apply_args(build_config(args), args)  # the shared flags, then --set
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import textwrap
import warnings
from typing import Callable

from jcv.train.config import Config

__all__ = ["HelpFormatter", "augment_ops_text", "make_parser", "apply_args", "config_from_args", "start", "run",
           "backend_preset", "fit_only_flags", "describe_presets", "user_errors", "guarded_main", "USAGE_ERRORS",
           "print_config"]

# Flags -> the Config field they set (--epochs: Config.with_length, --steps: a length in steps).
CONFIG_FLAGS = {"data_dir": "data.data_dir", "batch_size": "data.batch_size", "seed": "run.seed",
                "parallel": "run.parallel", "checkpoint_every": "run.checkpoint_every"}
# Flags only a jcv.train.fit run uses (not the cached-feature transfer runs).
FIT_ONLY = ("parallel", "checkpoint_every", "set")

HELP = {
    "workdir": "checkpoints, logs, figures and results.json go here; re-running resumes",
    "data_dir": "an image folder (root/<split>/<class>/<file>) or a tfds data_dir",
    "preset": "named preset",
    "epochs": "total epochs of the run (run.length; phases keep their shares)",
    "steps": "train N optimizer steps in total (run.length in steps; smoke tests)",
    "batch_size": "global batch size (all devices and processes)",
    "seed": "random seed",
    "parallel": "data parallelism of jcv.train.fit: jit (GSPMD) or pmap (shard_map)",
    "checkpoint_every": "also checkpoint every N steps",
    "set": "any other Config field as section.field=value, e.g. --set optim.learning_rate=0.05 "
           "(repeatable; Python literals; --print-config lists them)",
    "no_progress": "no tqdm progress bar (progress lines are still printed when not on a terminal)",
    "restart": "move an existing run in --workdir aside (to WORKDIR.old-<time>) and start afresh",
    "debug": "show the full traceback of an error",
    "print_config": "print the exact config this command would run (JSON) and exit",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """Keeps the description's layout; appends "(default: X)" to options that have a default,
  or "(default: <action.default_text>)" to those whose default is None and that have one."""

  def _get_help_string(self, action):
    text = action.help or ""
    if "default" in text or action.required:
      return text
    if action.default is None:
      unset = getattr(action, "default_text", None)
      return f"{text} (default: {unset})" if unset else text
    if action.default is False or action.default == [] or action.default == argparse.SUPPRESS:
      return text
    return f"{text} (default: %(default)s)"


def augment_ops_text() -> str:
  """One line naming the on-device augmentation ops ``augment.ops`` accepts."""
  from jcv.data.augment import OPS
  return "augment.ops entries: " + ", ".join(sorted(OPS)) + " (a name or (name, {options}); docs/data.md)"


def make_parser(description: str | None = None, *, presets=None, default_preset: str | None = None,
                default_workdir: str | None = None, helps: dict | None = None,
                epilog: str | None = None) -> argparse.ArgumentParser:
  """argparse parser with --workdir --data-dir --preset --epochs --steps --batch-size --seed
  --parallel --checkpoint-every --set key=value --no-progress, and multi-host flags.

  ``presets``: the names --preset accepts (Configs or any per-script recipe objects).
  ``--workdir`` is required unless ``default_workdir`` is given. ``helps`` replaces the help
  text of shared flags (keys are dest names, e.g. ``"data_dir"``); ``epilog`` defaults to a
  summary of Config presets. Scripts add their own options to the returned parser.
  """
  unknown = set(helps or {}) - set(HELP)
  if unknown:
    raise ValueError(f"helps: unknown shared flag(s) {sorted(unknown)}; expected {sorted(HELP)}")
  if epilog is None and presets:
    epilog = describe_presets(presets)
  epilog = "\n".join(filter(None, [epilog, textwrap.fill(augment_ops_text(), width=100)]))
  h = {**HELP, "preset": HELP["preset"] + (" (listed below)" if epilog else ""), **(helps or {})}
  p = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter)
  p.add_argument("--workdir", required=default_workdir is None, default=default_workdir, help=h["workdir"])
  p.add_argument("--data-dir", help=h["data_dir"])
  p.add_argument("--preset", default=default_preset, choices=sorted(presets) if presets else None,
                 help=h["preset"])
  preset_valued = [p.add_argument("--epochs", type=int, help=h["epochs"])]
  p.add_argument("--steps", type=int, help=h["steps"])
  preset_valued.append(p.add_argument("--batch-size", type=int, help=h["batch_size"]))
  preset_valued.append(p.add_argument("--seed", type=int, help=h["seed"]))
  for action in preset_valued if presets else ():
    action.default_text = "the preset's"  # shown while the default stays None
  p.add_argument("--parallel", choices=("jit", "pmap"), help=h["parallel"])
  p.add_argument("--checkpoint-every", type=int, metavar="N", help=h["checkpoint_every"])
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=h["set"])
  p.add_argument("--no-progress", action="store_true", help=h["no_progress"])
  p.add_argument("--restart", action="store_true", help=h["restart"])
  p.add_argument("--debug", action="store_true", help=h["debug"])
  p.add_argument("--print-config", action="store_true", help=h["print_config"])
  g = p.add_argument_group("multi-host (or $JCV_COORDINATOR_ADDRESS, $JCV_NUM_PROCESSES, $JCV_PROCESS_ID)")
  g.add_argument("--coordinator-address", help="host:port of process 0")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)
  return p


def describe_presets(presets, *, title: str = "presets:",
                     fields=("model.name", "data.image_size", "run.length", "data.batch_size", "optim.name",
                             "optim.learning_rate", "init.trainable", "model.dtype")) -> str:
  """A help epilog: one wrapped line per preset with its main Config ``fields`` (dotted paths;
  for a dict recipe, every item)."""
  lines = [title]
  for name, preset in presets.items():
    items = preset.items() if isinstance(preset, dict) else ((f, _get(preset, f)) for f in fields)
    text = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in items)
    if preset.run.phases if not isinstance(preset, dict) else ():
      text += ", phases: " + " then ".join(
          f"{c.run.length} trainable={c.init.trainable} lr={c.optim.learning_rate:g}" for c in preset.phase_configs())
    lines.append(textwrap.fill(f"{name}: {text}", width=100, initial_indent="  ", subsequent_indent="      "))
  return "\n".join(lines)


def _get(config, path: str):
  for name in path.split("."):
    config = getattr(config, name)
  return config


def apply_args(config: Config, args: argparse.Namespace) -> Config:
  """``config`` with the shared flags that were given (--data-dir --epochs --steps --batch-size
  --seed --parallel --checkpoint-every --no-progress), then the --set items, validated."""
  for flag, path in CONFIG_FLAGS.items():
    value = getattr(args, flag, None)
    if value is not None:
      config = config.set_path(path, f"{value} steps" if flag == "checkpoint_every" else value)
  if getattr(args, "no_progress", False):
    config = config.replace(run={"progress": False})
  if getattr(args, "epochs", None) is not None:
    config = config.with_length(f"{args.epochs} epochs")
  if getattr(args, "steps", None) is not None:
    config = config.replace(run={"length": f"{args.steps} steps"})
  return config.set(getattr(args, "set", None) or []).validate()


def print_config(config: Config) -> None:
  """Prints ``config`` as the JSON that ``config.json`` of its run will hold."""
  from jcv.train.init_from import resolve_preprocessing
  print(json.dumps(resolve_preprocessing(config).to_dict(), indent=1))


def config_from_args(args: argparse.Namespace, *, presets=None, base: Config | None = None) -> Config:
  """The preset (or ``base``/default Config) with the flags applied, then the --set items."""
  if presets and args.preset:
    if args.preset not in presets:
      raise ValueError(f"unknown preset {args.preset!r}; expected one of {sorted(presets)}")
    config = presets[args.preset]
  else:
    config = base or Config()
  return apply_args(config, args)


def fit_only_flags(args: argparse.Namespace) -> list[str]:
  """The given flags that only jcv.train.fit runs use (--parallel --checkpoint-every --set)."""
  return [f"--{name.replace('_', '-')}" for name in FIT_ONLY if getattr(args, name, None)]


def start(args: argparse.Namespace, *, host_devices: int | str | None = None, devices_per_core: int = 1) -> None:
  """Starts multi-host JAX when the flags (or $JCV_*) ask for it, then, on a CPU, tunes glibc
  malloc. Call it before any other JAX computation.

  ``host_devices="cores"``: one XLA CPU device per core (rounded down to a power of two, so
  batch sizes divide), which jcv's data-parallel step uses on a CPU-only machine (XLA:CPU
  runs each convolution on one core); an accelerator run ignores the extra CPU devices.
  ``devices_per_core`` multiplies that count (see :func:`jcv.perf.setup_cpu`).
  """
  from jcv import perf
  if host_devices is not None:
    perf.setup_cpu(host_devices=host_devices, malloc=False, devices_per_core=devices_per_core)
  # Reuse XLA's per-step buffers instead of faulting in fresh pages; before the backend starts
  # its threads (see perf.tune_malloc).
  tuned = perf.cpu_only() and perf.tune_malloc()
  from jcv.train import parallel
  parallel.initialize_distributed(coordinator_address=args.coordinator_address,
                                  num_processes=args.num_processes, process_id=args.process_id)
  import jax
  if not tuned and jax.default_backend() == "cpu":
    perf.tune_malloc()  # an accelerator plugin found no device: late, but still worth it


def backend_preset() -> str:
  """``"cpu"`` on a machine without an accelerator, else ``"gpu"`` (GPU or TPU)."""
  import jax
  return "cpu" if jax.default_backend() == "cpu" else "gpu"


def run(argv=None, *, presets=None, default_preset: str | None = None, base: Config | None = None,
        description: str | None = None, fit_kwargs: dict | Callable[[Config], dict] | None = None,
        default_workdir: str | None = None, host_devices: int | str | None = None,
        devices_per_core: int = 1) -> dict:
  """Parses flags, starts multi-host JAX if asked, runs ``fit`` and prints the results.

  ``fit_kwargs`` (e.g. ``train_source``, ``model``) go to ``fit``; a callable gets the final
  Config, after multi-host start-up. ``host_devices`` and ``devices_per_core`` go to :func:`start`. Exits with status 1 and the message on a non-finite
  loss, and 128 + signal after SIGINT/SIGTERM (once the checkpoint is saved).
  """
  parser = make_parser(description, presets=presets, default_preset=default_preset,
                       default_workdir=default_workdir)
  args = parser.parse_args(argv)
  with user_errors(debug=args.debug):  # a bad $JCV_NUM_PROCESSES etc.: one line
    start(args, host_devices=host_devices, devices_per_core=devices_per_core)
  try:
    config = config_from_args(args, presets=presets, base=base)
  except ValueError as e:  # a bad --set: usage and the message, exit status 2
    parser.error(str(e))
  if args.print_config:
    print_config(config)
    return {"config": config}
  import jax
  from jcv.train.trainer import fit
  with user_errors(debug=args.debug):
    if callable(fit_kwargs):
      fit_kwargs = fit_kwargs(config)
    results = fit(config, workdir=args.workdir, restart=args.restart, **(fit_kwargs or {}))
  if jax.process_index() == 0:
    summary = {"final_eval": results["final"]["eval"], "best": results["best"],
               "steps": results["steps"], "wall_time_s": round(results["wall_time_s"], 1),
               "train_img_per_s": results["train_img_per_s"], "stopped_by": results["stopped_by"]}
    print(json.dumps(summary))
  if str(results["stopped_by"]).startswith("SIG"):
    import signal
    sys.exit(128 + int(getattr(signal, results["stopped_by"])))
  return results


def _usage_errors() -> tuple:
  from jcv.data.sources import DataUnavailableError
  from jcv.weights.download import DownloadError
  return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
          DataUnavailableError, DownloadError)


USAGE_ERRORS = "ValueError, missing files, unavailable data or weights"  # what exits with 2


@contextlib.contextmanager
def user_errors(*, debug: bool = False):
  """Turns the errors a user can cause into one ``error: ...`` line on stderr and exit status
  2 (a non-finite loss: 1; a full disk: 2, also where a run did not name it), with no
  traceback unless ``debug``. Warnings print as one ``warning: ...`` line. Scripts wrap
  their main work in it (``cli.run`` does)."""
  from jcv.train.loop import NonFiniteLossError
  if not debug:
    warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"
  try:
    yield
  except NonFiniteLossError as e:
    if debug:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except _usage_errors() as e:
    if debug:
      raise
    print(f"error: {e} (--debug shows the traceback)", file=sys.stderr)
    sys.exit(2)
  except OSError as e:  # a full disk outside a run's own handling (which names the space needed)
    from jcv.train.diskfull import is_disk_full
    if debug or not is_disk_full(e):
      raise
    print(f"error: no space left on the device: {e} (free some space and re-run the command)", file=sys.stderr)
    sys.exit(2)


def guarded_main(main: Callable, argv=None):
  """``main(argv)`` under :func:`user_errors` (``--debug`` in the arguments shows tracebacks):
  ``if __name__ == "__main__": sys.exit(cli.guarded_main(main))``."""
  args = sys.argv[1:] if argv is None else argv
  with user_errors(debug="--debug" in args):
    return main(argv)
