"""jcv.models: the classic CNN architectures as Flax Linen modules, created by name.

``create(name, *, num_classes=1000, **options)`` builds a module called as
``model.apply(variables, images_float_nhwc, train=False)``; ``list_models()`` lists the
names, ``get_card(name)`` gives the model card and ``summary(name)`` prints a per-layer table
with parameters and MACs measured by XLA's cost analysis.
"""
from jcv.models import blocks, layers
from jcv.models.registry import ModelCard, create, discover, get_card, list_models, register
from jcv.models.summary import count_params, layer_table, measure_macs, summary

# Every module of this package is imported once (its @register decorators run): a new family
# file needs no line here.
discover()

__all__ = ["ModelCard", "blocks", "count_params", "create", "discover", "get_card", "layers",
           "list_models", "layer_table", "measure_macs", "register", "summary"]
