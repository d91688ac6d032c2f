"""Input pipeline: sources (image folders, tfds, arrays) → grain host transforms → uint8
batches → on-device augmentation inside the jitted train step.

Submodules: :mod:`jcv.data.sources` (with :mod:`jcv.data.folders`),
:mod:`jcv.data.transforms`, :mod:`jcv.data.pipeline` (with :mod:`jcv.data.batches`),
:mod:`jcv.data.augment` (with :mod:`jcv.data.affine`), :mod:`jcv.data.decode`,
:mod:`jcv.data.tfds_folder`.
"""
import importlib

__all__ = ["affine", "augment", "batches", "decode", "folders", "pipeline", "sources", "tfds_folder",
           "transforms"]


def __getattr__(name):
  if name in __all__:
    return importlib.import_module(f"jcv.data.{name}")
  raise AttributeError(f"module 'jcv.data' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
