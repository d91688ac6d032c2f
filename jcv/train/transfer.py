"""Transfer learning: the three regimes as Config fields, for a staged model.

Regimes (as the course's notebook 3_2), for a staged model such as ``mobilenet_v2``
(``model.stage_names()``: ``stem, block_0 .. block_16, last_conv``, then the ``head``), each
one ``Config`` away (``jcv.train.fit`` runs them all):

- ``scratch`` (``trainable="all"``, no ``init_from``): every parameter trains from a random init.
- ``frozen`` (``trainable="head"``): only the new head trains. The backbone's parameters are
  labelled frozen (``optax.set_to_zero``), its BatchNorm runs in inference mode and no
  backward pass goes through it (model option ``frozen_stages``). With
  ``feature_cache={}`` the backbone runs once over the data (jcv.train.features).
- ``finetune`` (``trainable=N``): the top N stages train with the backbone learning rate
  scaled by ``backbone_lr_multiplier`` (``optax.partition``); the rest stays frozen and
  BatchNorm stays in inference mode (the TF tutorial's advice for small data sets).

Pretrained weights come from ``Config.init_from`` (jcv.train.init_from); "head first, then
fine-tune" is ``Config.phases``. Replacements of names this module used to have:
``fit_cached``/``cached_transfer`` -> ``fit`` with ``trainable`` and ``feature_cache``;
``evaluate_cached``/``predict_cached`` -> ``jcv.train.evaluate`` and
``jcv.train.evaluation.collect_logits`` on the run folder; ``PretrainedModel`` ->
``Config.init_from`` or ``fit(..., init_variables=...)``; ``split_epochs`` ->
``Config.with_epochs``; ``split_steps`` -> ``fit``'s ``steps`` budget over the phases.
"""
from __future__ import annotations

from jcv.train.config import Config
from jcv.train.evaluation import save_run
from jcv.train.features import (cache_features, compute_features, merge_variables, pool_cached,
                                split_model, top_variables)

__all__ = [
    "REGIMES", "cache_features", "compute_features", "merge_variables", "pool_cached", "regime_options",
    "save_run", "split_model", "top_variables", "transfer_config",
]

REGIMES = ("scratch", "frozen", "finetune")
_NOT_HEAD = "^(?!head/)"  # every parameter path outside the classifier head


def regime_options(regime: str, *, stage_names: list[str], trainable_stages: int | None = None,
                   backbone_lr_multiplier: float = 0.1, train_bn: bool = False) -> dict:
  """``Config`` fields (``freeze``, ``lr_multipliers``, ``model_options``) for a regime.

  ``stage_names`` comes from ``model.stage_names()``; ``trainable_stages`` (finetune only)
  counts from the top, ``None`` meaning all of them.
  """
  count = len(stage_names)
  if regime == "scratch":
    return {"freeze": (), "lr_multipliers": {}, "model_options": {}}
  if regime == "frozen":
    return {"freeze": (_NOT_HEAD,), "lr_multipliers": {},
            "model_options": {"frozen_stages": count}}
  if regime != "finetune":
    raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
  trainable = count if trainable_stages is None else int(trainable_stages)
  if not 0 <= trainable <= count:
    raise ValueError(f"trainable_stages must be in [0, {count}], got {trainable_stages}")
  frozen = count - trainable
  freeze = ("^(" + "|".join(stage_names[:frozen]) + ")/",) if frozen else ()
  options = {"frozen_stages": frozen, "frozen_bn_stages": 0 if train_bn else count}
  return {"freeze": freeze, "lr_multipliers": {_NOT_HEAD: backbone_lr_multiplier},
          "model_options": options}


def transfer_config(config: Config, regime: str, *, stage_names: list[str], **options) -> Config:
  """``config`` with the regime's freezing, learning-rate groups and model options merged in."""
  fields = regime_options(regime, stage_names=stage_names, **options)
  return config.replace(freeze=fields["freeze"], lr_multipliers=fields["lr_multipliers"],
                        model_options={**config.model_options, **fields["model_options"]})
