"""Where a run's initial variables come from, declared in ``Config.init_from``.

``init_from`` maps init-step names to their options; the steps run in order on the model's
variables (random init from ``Config.seed`` unless a step provides others)::

  Config(model="mobilenet_v2", init_from={"pretrained": {"weights": "mobilenet_v2_1.0_224_no_top"}},
         mean="pretrained", std="pretrained")          # ImageNet weights, their preprocessing
  Config(model="cifar_cnn", init_from={"whiten": {"num_images": 5000}})   # data-whitened first layer

Adding a step is one entry in :data:`INIT_STEPS`: ``fn(variables, config, *, model,
train_source, options) -> variables``. ``mean``/``std`` set to ``"pretrained"`` take the
normalisation the pretrained weights were trained with (:func:`pretrained_preprocessing`).
"""
from __future__ import annotations

import warnings

import jax
import numpy as np

from jcv.train.config import Config

__all__ = ["INIT_STEPS", "PREPROCESSING", "initial_variables", "pretrained_preprocessing",
           "resolve_preprocessing"]

# Preprocessing of the published ImageNet weights, on [0, 1] images, per model family.
PREPROCESSING = {
    "mobilenet_v1": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},  # [0, 1] -> [-1, 1]
    "mobilenet_v2": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
}


def pretrained_preprocessing(model: str) -> dict:
  """{"mean", "std"} the pretrained weights of ``model`` expect (on [0, 1] images).

  Uses ``jcv.weights.pretrained_info(model)`` when jcv.weights provides it, else
  :data:`PREPROCESSING`.
  """
  import jcv.weights
  info_fn = getattr(jcv.weights, "pretrained_info", None)
  if info_fn is not None:
    info = info_fn(model)
    get = info.get if isinstance(info, dict) else (lambda k: getattr(info, k, None))
    if get("mean") is not None:
      return {"mean": tuple(get("mean")), "std": tuple(get("std"))}
  if model not in PREPROCESSING:
    raise ValueError(f"no pretrained preprocessing known for model {model!r}: set mean and std "
                     f"explicitly (known: {sorted(PREPROCESSING)})")
  return dict(PREPROCESSING[model])


def resolve_preprocessing(config: Config) -> Config:
  """``config`` with ``mean``/``std`` of ``"pretrained"`` replaced by the weights' numbers."""
  if config.mean != "pretrained" and config.std != "pretrained":
    return config
  info = pretrained_preprocessing(config.model)
  return config.replace(mean=info["mean"] if config.mean == "pretrained" else config.mean,
                        std=info["std"] if config.std == "pretrained" else config.std)


def _pretrained(variables, config, *, model, train_source, options):
  """Pretrained weights (``options["weights"]``: a file or a jcv.weights download name; optional
  ``"head"`` file) ported into the model; a new head is initialised from ``config.seed``."""
  del variables, train_source
  import jcv.weights
  if "weights" not in options:
    raise ValueError('init_from["pretrained"] needs "weights": a weights file or a download name')
  unknown = set(options) - {"weights", "head"}
  if unknown:
    raise ValueError(f'init_from["pretrained"]: unknown option(s) {sorted(unknown)}; expected weights, head')
  model_options = dict(config.model_options)
  if config.dtype != "float32":
    import jax.numpy as jnp
    model_options["dtype"] = jnp.dtype(config.dtype)
  _, out = jcv.weights.pretrained(config.model, options["weights"], num_classes=model.num_classes,
                                  head=options.get("head"), seed=config.seed, **model_options)
  return out


def _whiten(variables, config, *, model, train_source, options):
  """The ``whiten`` layer's kernel computed from the first ``num_images`` (5000) training
  images, normalised as the train step normalises them (jcv.models.cifar, airbench)."""
  from jcv.models.cifar import whitening_init_from_source
  unknown = set(options) - {"num_images", "eps"}
  if unknown:
    raise ValueError(f'init_from["whiten"]: unknown option(s) {sorted(unknown)}; expected num_images, eps')
  from jcv.data import pipeline
  from jcv.data.sources import ArraySource
  # The training source through the loaders' transforms: any image sizes, corrupt files skipped.
  n = min(int(options.pop("num_images", 5000)), len(train_source))
  it = iter(pipeline.eval_loader(train_source, batch_size=max(1, min(256, n)), image_size=config.image_size,
                                 crop_fraction=1.0, process_index=0, process_count=1))
  images = []
  for batch in it:
    images.extend(np.asarray(batch["image"])[np.asarray(batch["mask"], bool)])
    if len(images) >= n:
      break
  if it.num_skipped:
    warnings.warn(f"whitening initialisation: skipped {it.num_skipped} corrupt image file(s)")
  kernel = variables["params"]["whiten"]["kernel"]
  size = (0, config.image_size, config.image_size, 3)
  images = np.stack(images[:n]) if images else np.zeros(size, np.uint8)  # none: the error names it
  init = whitening_init_from_source(ArraySource(images, np.zeros(len(images), np.int32)), mean=config.mean,
                                    std=config.std, kernel_size=kernel.shape[0], num_images=n, **options)
  params = dict(variables["params"])
  params["whiten"] = dict(params["whiten"], kernel=init(None, kernel.shape, kernel.dtype))
  return {**variables, "params": params}


INIT_STEPS = {"pretrained": _pretrained, "whiten": _whiten}


def initial_variables(config: Config, model, train_source=None) -> dict | None:
  """The variables ``config.init_from`` declares, or None (train from the random init)."""
  if not config.init_from:
    return None
  from jcv.train.state import init_variables
  variables = None
  for name, options in config.init_from.items():
    if name not in INIT_STEPS:
      raise ValueError(f"unknown init_from step {name!r}; expected one of {sorted(INIT_STEPS)}")
    if variables is None and name != "pretrained":
      variables = init_variables(jax.random.key(config.seed), model,
                                 (1, config.image_size, config.image_size, 3))
    variables = INIT_STEPS[name](variables, config, model=model, train_source=train_source,
                                 options=dict(options or {}))
  return variables
