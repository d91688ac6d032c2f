"""The flags every experiment script shares, and a ``run`` that turns them into ``fit``.

An experiment script is a few presets plus::

  if __name__ == "__main__":
    jcv.train.cli.run(presets={"cpu": CPU, "gpu": GPU}, default_preset="cpu", description=__doc__)
"""
from __future__ import annotations

import argparse
import json
import sys

from jcv.train.config import Config

__all__ = ["make_parser", "config_from_args", "run"]


def make_parser(description: str | None = None, *, presets=None, default_preset: str | None = None
                ) -> argparse.ArgumentParser:
  """argparse parser with --workdir --data-dir --preset --epochs --steps --batch-size --seed
  --parallel --checkpoint-every --set key=value, and multi-host flags."""
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True,
                 help="checkpoints, logs, figures and results.json go here; re-running resumes")
  p.add_argument("--data-dir", help="an image folder (root/<split>/<class>/<file>) or a tfds data_dir")
  p.add_argument("--preset", default=default_preset,
                 choices=sorted(presets) if presets else None, help="named Config preset")
  p.add_argument("--epochs", type=int)
  p.add_argument("--steps", type=int, help="stop after N optimizer steps in total (smoke tests)")
  p.add_argument("--batch-size", type=int, help="global batch size (all devices and processes)")
  p.add_argument("--seed", type=int)
  p.add_argument("--parallel", choices=("jit", "pmap"))
  p.add_argument("--checkpoint-every", type=int, help="also checkpoint every N steps")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="any other Config field, e.g. --set learning_rate=0.05 (repeatable)")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  g = p.add_argument_group("multi-host (or $JCV_COORDINATOR_ADDRESS, $JCV_NUM_PROCESSES, $JCV_PROCESS_ID)")
  g.add_argument("--coordinator-address", help="host:port of process 0")
  g.add_argument("--num-processes", type=int)
  g.add_argument("--process-id", type=int)
  return p


def config_from_args(args: argparse.Namespace, *, presets=None, base: Config | None = None) -> Config:
  """The preset (or ``base``/default Config) with the flags applied, then the --set items."""
  if presets and args.preset:
    if args.preset not in presets:
      raise ValueError(f"unknown preset {args.preset!r}; expected one of {sorted(presets)}")
    config = presets[args.preset]
  else:
    config = base or Config()
  changes = {name: getattr(args, name) for name in
             ("data_dir", "epochs", "steps", "batch_size", "seed", "parallel", "checkpoint_every")
             if getattr(args, name, None) is not None}
  if getattr(args, "no_progress", False):
    changes["progress"] = False
  return config.replace(**changes).set(args.set).validate()


def run(argv=None, *, presets=None, default_preset: str | None = None, base: Config | None = None,
        description: str | None = None, fit_kwargs: dict | None = None) -> dict:
  """Parses flags, starts multi-host JAX if asked, runs ``fit`` and prints the results.

  Exits with status 1 and the message on a non-finite loss, and 128 + signal after
  SIGINT/SIGTERM (once the checkpoint is saved).
  """
  args = make_parser(description, presets=presets, default_preset=default_preset).parse_args(argv)
  from jcv.train import parallel
  parallel.initialize_distributed(coordinator_address=args.coordinator_address,
                                  num_processes=args.num_processes, process_id=args.process_id)
  config = config_from_args(args, presets=presets, base=base)
  import jax
  if jax.default_backend() == "cpu":
    from jcv import perf
    perf.tune_malloc()  # reuse XLA's per-step buffers instead of faulting in fresh pages
  from jcv.train import loop
  try:
    results = loop.fit(config, workdir=args.workdir, **(fit_kwargs or {}))
  except loop.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    summary = {"final_eval": results["final"]["eval"], "best": results["best"],
               "steps": results["steps"], "wall_time_s": round(results["wall_time_s"], 1),
               "train_img_per_s": results["train_img_per_s"], "stopped_by": results["stopped_by"]}
    print(json.dumps(summary))
  if results["stopped_by"]:
    import signal
    sys.exit(128 + int(getattr(signal, results["stopped_by"])))
  return results
