"""The recipes ``jcv train`` starts from, one per regime; the experiment scripts specialise them.

- :data:`FINETUNE`: an ImageNet backbone with a new head, every stage training at 0.3x the
  head's rate with BatchNorm in inference mode; 176 px random-resized crops (area 0.25-1),
  flip and colour jitter, AdamW 1e-3, label smoothing 0.1, half an epoch of warmup, cosine;
  evaluated on the whole image at 208 px with flip TTA. It is food101's ``cpu`` recipe
  (chosen on a validation split carved from food101_10's train; docs/transfer.md).
- :data:`SCRATCH`: from a random init: random-resized crops (area 0.25-1), flip, AdamW 2e-3
  with weight decay 0.05, label smoothing 0.1, one epoch of warmup, cosine.
"""
from __future__ import annotations

from jcv.train.config import Config
from jcv.train.sections import Augment, Data, Evaluation, Init, Optim, Pretrained, Run, Schedule

__all__ = ["FINETUNE", "SCRATCH", "IMAGENET_MEAN", "IMAGENET_STD", "COLOR_JITTER"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # natural photos, on [0, 1]
COLOR_JITTER = ("color_jitter", {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.02})

FINETUNE = Config(
    data=Data(image_size=176, crop="random_resized", crop_scale=(0.25, 1.0), batch_size=32, mean="pretrained",
              std="pretrained"),
    augment=Augment(ops=("flip", COLOR_JITTER), label_smoothing=0.1),
    init=Init(pretrained=Pretrained(), trainable="backbone", backbone_lr_multiplier=0.3),
    optim=Optim(name="adamw", learning_rate=1e-3, weight_decay=1e-4),
    schedule=Schedule(warmup="0.5 epochs"),
    evaluation=Evaluation(image_size=208, crop_fraction=1.0, tta_flip=True),
    run=Run(length="7 epochs"),
)

SCRATCH = Config(
    data=Data(crop="random_resized", crop_scale=(0.25, 1.0), batch_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    augment=Augment(ops=("flip",), label_smoothing=0.1),
    optim=Optim(name="adamw", learning_rate=2e-3, weight_decay=0.05),
    schedule=Schedule(warmup="1 epochs"),
    run=Run(length="30 epochs"),
)
