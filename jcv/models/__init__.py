"""jcv.models: the classic CNN architectures as Flax Linen modules, created by name.

``create(name, *, num_classes=1000, **options)`` builds a module called as
``model.apply(variables, images_float_nhwc, train=False)``; ``list_models()`` lists the
names, ``get_card(name)`` gives the model card and ``summary(name)`` prints a per-layer table
with parameters and MACs measured by XLA's cost analysis.
"""
import importlib
import importlib.util

from jcv.models import layers
from jcv.models.registry import ModelCard, create, get_card, list_models, register
from jcv.models.summary import count_params, layer_table, measure_macs, summary

# Importing a family module registers its models.
from jcv.models import alexnet, inception, resnet, simple, spp, vgg  # noqa: E402,F401

for _family in ("cifar", "mobilenet"):  # written by other helpers; imported once they exist
  if importlib.util.find_spec(f"jcv.models.{_family}") is not None:
    importlib.import_module(f"jcv.models.{_family}")

__all__ = ["ModelCard", "count_params", "create", "get_card", "layers", "list_models",
           "layer_table", "measure_macs", "register", "summary"]
