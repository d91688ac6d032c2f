"""jcv.train: pure train/eval steps, Optax setup, data parallelism, Orbax checkpoints, the loop.

Quick use::

  from jcv.train import Config, fit
  results = fit(Config(model="resnet20", dataset="../shared/data/cifar10", epochs=1), workdir="runs/x")
"""
import importlib

from jcv.train.config import Config
from jcv.train.optim import make_optimizer, make_schedule
from jcv.train.state import TrainState, create_train_state
from jcv.train.step import eval_step, predict_logits, train_step

__all__ = [
    "Config", "TrainState", "create_train_state", "train_step", "eval_step", "predict_logits",
    "make_optimizer", "make_schedule", "fit", "evaluate",
    "build", "checkpoint", "cli", "config", "evaluation", "features", "init_from", "log", "loop", "losses",
    "optim", "parallel", "phases", "precise_bn", "state", "step", "transfer",
]


def fit(config, *, workdir, **kwargs):
  """Trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint); see jcv.train.loop.fit."""
  from jcv.train import loop
  return loop.fit(config, workdir=workdir, **kwargs)


def evaluate(*args, **kwargs):
  """Evaluates a run's checkpoint; see jcv.train.evaluation.evaluate."""
  from jcv.train import evaluation
  return evaluation.evaluate(*args, **kwargs)


def __getattr__(name):
  if name in ("build", "checkpoint", "cli", "evaluation", "features", "init_from", "log", "loop", "parallel",
              "phases", "precise_bn", "transfer"):
    return importlib.import_module(f"jcv.train.{name}")
  raise AttributeError(f"module 'jcv.train' has no attribute {name!r}")
