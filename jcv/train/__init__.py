"""jcv.train: one trainer, ``fit``, over typed Config sections.

Quick use::

  from jcv.train import Config, Data, Model, Run, fit
  results = fit(Config(data=Data(dataset="../shared/data/cifar10"), model=Model(name="resnet20"),
                       run=Run(length="1 epochs")), workdir="runs/x")

Layers, each importing only those below it (docs/design.md): ``durations``, ``sections``,
``config`` and the tables (``optim``, ``optax_extras``, ``recipes``); the building blocks
(``state``, ``step``, ``parallel``, ``checkpoint``, ``diskfull``, ``log``, ``meters``, ``rundir``,
``build``, ``features``, ``evaluation``, ``init_from``, ``watch``, ``budget``); ``loop`` (one run
folder); ``trainer`` (``fit``: every regime, phases); ``report``, ``compare``, ``cli`` and
``command`` (``jcv train``) on top.
"""
import importlib

from jcv.train.config import Config
from jcv.train.sections import (Augment, Data, EarlyStopping, Evaluation, FeatureCache, Init, Lookahead, Model, Muon,
                                Optim, Phase, Plateau, Pretrained, Run, Schedule, Whiten)

_MODULES = (
    "budget", "build", "checkpoint", "classmap", "cli", "command", "compare", "config", "diskfull", "durations",
    "evaluation", "features", "fieldtypes", "init_from", "invariance", "log", "loop", "losses", "meters", "optim",
    "optax_extras", "parallel", "precise_bn", "recipes", "report", "rundir", "sections", "state", "step", "trainer",
    "watch")
__all__ = [
    "Config", "Data", "Augment", "Model", "Init", "Pretrained", "Whiten", "FeatureCache", "Optim", "Muon",
    "Lookahead", "Schedule", "Plateau", "Evaluation", "EarlyStopping", "Run", "Phase", "fit", "evaluate",
] + list(_MODULES)


def fit(config, *, workdir, **kwargs):
  """Trains per ``config`` in ``workdir`` (resuming if it holds a checkpoint); see jcv.train.trainer.fit."""
  from jcv.train import trainer
  return trainer.fit(config, workdir=workdir, **kwargs)


def evaluate(*args, **kwargs):
  """Evaluates a run's checkpoint; see jcv.train.evaluation.evaluate."""
  from jcv.train import evaluation
  return evaluation.evaluate(*args, **kwargs)


def __getattr__(name):
  if name in _MODULES:
    return importlib.import_module(f"jcv.train.{name}")
  raise AttributeError(f"module 'jcv.train' has no attribute {name!r}")
