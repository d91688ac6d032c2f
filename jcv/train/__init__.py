"""jcv.train: one trainer, ``fit``, over typed Config sections.

Quick use::

  from jcv.train import Config, Data, Model, Run, fit
  results = fit(Config(data=Data(dataset="../shared/data/cifar10"), model=Model(name="resnet20"),
                       run=Run(length="1 epochs")), workdir="runs/x")

Layers, each importing only those below it: ``durations``, ``sections``, ``config`` and the
tables (``optim``); the building blocks (``state``, ``step``, ``parallel``, ``checkpoint``,
``log``, ``rundir``, ``build``, ``features``, ``evaluation``, ``init_from``); ``loop`` (one run
folder); ``trainer`` (``fit``: every regime, phases); ``cli`` on top.
"""
import importlib

from jcv.train.config import Config
from jcv.train.sections import (Augment, Data, EarlyStopping, Evaluation, FeatureCache, Init, Lookahead, Model, Muon,
                                Optim, Phase, Plateau, Pretrained, Run, Schedule, Whiten)

__all__ = [
    "Config", "Data", "Augment", "Model", "Init", "Pretrained", "Whiten", "FeatureCache", "Optim", "Muon",
    "Lookahead", "Schedule", "Plateau", "Evaluation", "EarlyStopping", "Run", "Phase", "fit", "evaluate",
    "build", "checkpoint", "cli", "config", "durations", "evaluation", "features", "init_from", "log", "loop",
    "losses", "optim", "optax_extras", "parallel", "precise_bn", "sections", "state", "step", "trainer",
]


def fit(config, *, workdir, **kwargs):
  """Trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint); see jcv.train.trainer.fit."""
  from jcv.train import trainer
  return trainer.fit(config, workdir=workdir, **kwargs)


def evaluate(*args, **kwargs):
  """Evaluates a run's checkpoint; see jcv.train.evaluation.evaluate."""
  from jcv.train import evaluation
  return evaluation.evaluate(*args, **kwargs)


def __getattr__(name):
  if name in ("build", "checkpoint", "cli", "durations", "evaluation", "features", "init_from", "log", "loop",
              "losses", "optim", "optax_extras", "parallel", "precise_bn", "sections", "state", "step", "trainer"):
    return importlib.import_module(f"jcv.train.{name}")
  raise AttributeError(f"module 'jcv.train' has no attribute {name!r}")
