"""Where a run's initial variables come from: ``Config.init`` (jcv.train.sections.Init).

The steps run in order on the model's variables (random init from ``run.seed`` unless a step
provides others)::

  Config(model=Model(name="mobilenet_v2"), init=Init(pretrained=Pretrained("mobilenet_v2_1.0_224_no_top")),
         data=Data(mean="pretrained", std="pretrained"))     # ImageNet weights, their preprocessing
  Config(model=Model(name="cifar_cnn"), init=Init(whiten=Whiten(num_images=5000)))  # data-whitened first layer

``data.mean``/``data.std`` of ``"pretrained"`` take the normalisation the pretrained weights were
trained with, declared once with the weights (``jcv.weights.pretrained_info``).
"""
from __future__ import annotations

import warnings

import jax
import numpy as np

from jcv.train import build
from jcv.train.config import Config
from jcv.train.state import init_variables

__all__ = ["initial_variables", "resolve_preprocessing"]


def resolve_preprocessing(config: Config) -> Config:
  """``config`` with ``data.mean``/``data.std`` of ``"pretrained"`` replaced by the weights' numbers."""
  d = config.data
  if d.mean != "pretrained" and d.std != "pretrained":
    return config
  import jcv.weights
  info = jcv.weights.pretrained_info(config.model.name)
  return config.replace(data={"mean": tuple(info.mean) if d.mean == "pretrained" else d.mean,
                              "std": tuple(info.std) if d.std == "pretrained" else d.std})


def _pretrained(config: Config, model) -> dict:
  """The pretrained weights ported into the model; a new head is initialised from ``run.seed``."""
  import jcv.weights
  options = build.model_options(config)
  p = config.init.pretrained
  _, out = jcv.weights.pretrained(config.model.name, p.weights, num_classes=model.num_classes, head=p.head,
                                  seed=config.run.seed, **options)
  return out


def _whiten(variables, config: Config, train_source) -> dict:
  """The ``whiten`` layer's kernel from the first training images, read through the loaders'
  transforms (any image sizes; corrupt files skipped and counted) and normalised as the train
  step normalises them (jcv.models.cifar, airbench)."""
  from jcv.data import pipeline
  from jcv.data.sources import ArraySource
  from jcv.models.cifar import whitening_init_from_source
  w, size = config.init.whiten, config.data.image_size
  n = min(w.num_images, len(train_source))
  it = iter(pipeline.eval_loader(train_source, batch_size=max(1, min(256, n)), image_size=size,
                                 crop_fraction=1.0, process_index=0, process_count=1))
  images = []
  for batch in it:
    images.extend(np.asarray(batch["image"])[np.asarray(batch["mask"], bool)])
    if len(images) >= n:
      break
  if it.num_skipped:
    warnings.warn(f"whitening initialisation: skipped {it.num_skipped} corrupt image file(s)")
  images = np.stack(images[:n]) if images else np.zeros((0, size, size, 3), np.uint8)  # none: the error names it
  kernel = variables["params"]["whiten"]["kernel"]
  init = whitening_init_from_source(ArraySource(images, np.zeros(len(images), np.int32)), mean=config.data.mean,
                                    std=config.data.std, kernel_size=kernel.shape[0], num_images=n, eps=w.eps)
  params = dict(variables["params"])
  params["whiten"] = dict(params["whiten"], kernel=init(None, kernel.shape, kernel.dtype))
  return {**variables, "params": params}


def initial_variables(config: Config, model, train_source=None) -> dict | None:
  """The variables ``config.init`` declares, or None (train from the random init)."""
  init = config.init
  if init.pretrained is None and init.whiten is None:
    return None
  if init.pretrained is not None:
    variables = _pretrained(config, model)
  else:
    variables = init_variables(jax.random.key(config.run.seed), model, (1,) + build.example_shape(config))
  if init.whiten is not None:
    variables = _whiten(variables, config, train_source)
  return variables

