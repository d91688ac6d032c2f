"""jcv.models: the classic CNN architectures as Flax Linen modules, created by name."""
from jcv.models import layers
from jcv.models.registry import ModelCard, create, get_card, list_models, register

__all__ = ["ModelCard", "create", "get_card", "layers", "list_models", "register"]
