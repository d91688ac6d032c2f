"""jcv: computer-vision training in JAX/Flax.

Subpackages are imported lazily so ``import jcv`` stays fast:
``jcv.ops`` (image processing), ``jcv.data`` (sources, host transforms, on-device
augmentation, loaders), ``jcv.models`` (architectures by name), ``jcv.weights``
(pretrained ports), ``jcv.train`` (train/eval steps, parallelism, checkpoints, loop),
``jcv.plots`` (figures), ``jcv.perf`` (CPU speed setup: XLA host devices, malloc, compilation cache).
"""
import importlib

__version__ = "0.1.0"
__all__ = ["data", "models", "ops", "perf", "plots", "train", "weights"]


def __getattr__(name):
  if name in __all__:
    return importlib.import_module(f"jcv.{name}")
  raise AttributeError(f"module 'jcv' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
