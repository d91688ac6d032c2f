"""Subprocess entry point for the resume, signal and multi-host tests.

A real ``jcv.train.cli.run`` on in-memory arrays with the registered ``advanced_cnn`` shrunk
to one 8-channel stage; after the run, every process restores the newest checkpoint and
writes its parameters to ``<workdir>/params_p<process>.npz``.
"""
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # tiny.py, and the jcv of this checkout (not an installed one)

import numpy as np  # noqa: E402

from jcv.train import Augment, Config, Data, Model, Optim, Run, Schedule, cli  # noqa: E402
from tiny import array_sources  # noqa: E402

BASE = Config(
    data=Data(image_size=8, batch_size=16, mean=(0.3, 0.3, 0.3), std=(0.2, 0.2, 0.2)),
    augment=Augment(ops=("flip", ("pad_crop", {"padding": 1}))),
    model=Model(name="advanced_cnn", options={"widths": (8,), "convs_per_stage": 1, "hidden": 16,
                                              "dropout_rate": 0.2}),
    optim=Optim(name="sgd", learning_rate=0.05), schedule=Schedule(name="cosine"),
    run=Run(length="2 epochs", log_every="5 steps", progress=False, plots=False, compilation_cache=None,
            keep_checkpoints=2))


def dump_params(workdir):
  import jax
  from jcv.train import evaluation, parallel
  from jcv.train.optim import param_paths
  _, _, state, _ = evaluation.load_run(workdir, which="latest")
  params = parallel.fetch(state.params)
  flat = dict(zip(jax.tree.leaves(param_paths(params)), jax.tree.leaves(params)))
  np.savez(pathlib.Path(workdir) / f"params_p{jax.process_index()}.npz", step=int(parallel.fetch(state.step)), **flat)


def kill_during_save(step: int):
  """Fault injection: SIGKILL this process right after the asynchronous save of ``step`` starts."""
  import os
  import signal

  import jax
  from jcv.train import checkpoint
  original = checkpoint.RunCheckpointer.save

  def save(self, state, **kwargs):
    out = original(self, state, **kwargs)
    if int(jax.device_get(state.step)) == step:
      os.kill(os.getpid(), signal.SIGKILL)  # the checkpoint's files are being written
    return out

  checkpoint.RunCheckpointer.save = save


def disk_full_from_step(step: int):
  """Fault injection: the background write of every checkpoint from ``step`` on fails with ENOSPC
  (Orbax's JSON item writer, run in Orbax's save threads like the array writes)."""
  import errno
  import os

  import orbax.checkpoint as ocp
  original = ocp.handlers.JsonCheckpointHandler._save_fn

  async def save_fn(self, x, directory):
    if int(directory.parent.name.split(".")[0]) >= step:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "metadata"))
    return await original(self, x, directory)

  ocp.handlers.JsonCheckpointHandler._save_fn = save_fn


def logs_full_from_step(step: int):
  """Fault injection: appending a metrics.jsonl record of ``step`` or later fails with ENOSPC."""
  import errno
  import json
  import os

  from jcv import safefile
  original = safefile.open_append

  class FullFrom:
    def __init__(self, f):
      self._f = f

    def write(self, text):
      if json.loads(text).get("step", 0) >= step:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
      return self._f.write(text)

    def __getattr__(self, name):
      return getattr(self._f, name)

  safefile.open_append = lambda path, **kw: FullFrom(original(path, **kw))


if __name__ == "__main__":
  import os
  if os.environ.get("JCV_TEST_KILL_IN_SAVE"):
    kill_during_save(int(os.environ["JCV_TEST_KILL_IN_SAVE"]))
  if os.environ.get("JCV_TEST_DISK_FULL_FROM"):
    disk_full_from_step(int(os.environ["JCV_TEST_DISK_FULL_FROM"]))
  if os.environ.get("JCV_TEST_LOGS_FULL_FROM"):
    logs_full_from_step(int(os.environ["JCV_TEST_LOGS_FULL_FROM"]))
  train, evaluation = array_sources(256, 40)
  cli.run(sys.argv[1:], base=BASE, fit_kwargs={"train_source": train, "eval_source": evaluation})
  workdir = sys.argv[sys.argv.index("--workdir") + 1]
  dump_params(workdir)
