"""CIFAR-10 from scratch: the airbench recipe (Jordan 2024) on jcv.

Run (real JPEGs in an image folder; tfds ``cifar10`` when --data-dir is a tfds data_dir):

  python experiments/cifar10.py --preset cpu --data-dir ../shared/data/cifar10 --workdir runs/cifar10_cpu
  python experiments/cifar10.py --preset gpu --data-dir ../shared/data/cifar10 --workdir runs/cifar10_gpu

Hyperparameter search on a 45k/5k split carved from train (the test split stays unseen):

  python experiments/cifar10.py ... --set val_fraction=0.1 --set eval_split=val

The recipe: ``cifar_cnn`` (whitening 2x2 first layer computed from 5,000 training images and
frozen, dirac-initialised 3x3 convs, BN without scale, GELU), label smoothing 0.2, alternating
flips + random translate-by-2 (reflect padding), mirror + translate test-time augmentation, and
one of airbench's two optimisers:
- airbench94 (``gpu``, ``cpu_sgd``): Nesterov SGD (momentum 0.85) with a linear one-cycle
  schedule (start 0.2, peak at 23 %, end 0.07 of the peak), BN biases at 64x the learning rate,
  L2 weight decay through the momentum, lookahead every 5 steps;
- airbench94_muon (``cpu``): Muon on the conv kernels (momentum 0.6, 3 Newton-Schulz steps,
  kernels renormalised every step), SGD for the head and BN biases, a linear decay to 0, the
  whitening bias trained for the first 3 epochs only; at the end the BatchNorm statistics are
  re-averaged over 10k training images (precise BN).

Presets:
- ``cpu``: half width, batch 128, Muon, 13 epochs, float32, two XLA CPU devices per core: sized
  for 20 minutes on a 2-core CPU.
- ``cpu_sgd``: the same net with airbench94's SGD + lookahead, 12 epochs.
- ``gpu``: airbench94's full-width net, batch 1024, 10 epochs, bfloat16. On one H200: test
  90.64 % top-1 in 32.7 s of fit (compilation and an evaluation after every epoch included),
  55 s for the whole process; airbench94 itself reaches 94.0 % in 3.8 s on an A100 on the
  original CIFAR-10 (this is the JPEG copy, quality ~75).

Measured (../shared/data/cifar10 test split, TTA, 2-core Xeon alone, 2026-11-28; docs/cifar10.md):
- ``--preset cpu``: 89.33 % top-1 (99.53 % top-5) in 19.4 min wall (18.7 min in fit, 595 img/s);
  whitening layer as im2col + matmul, a slower phase of the VM: 89.06 % (99.61 %) in 21.1 min
  (540 img/s), and with precise BN (now in the preset) 89.30 % (99.60 %) in 23.4 min (486 img/s);
  the same recipe at 11 epochs on one device per core: 89.14 % in 20.1 min.
- ``--preset cpu_sgd``: 88.86 % (99.49 %) in 17.8 min (598 img/s); the same loop ran
  ~15 % slower on the day the Muon run was measured (510 vs 598 img/s), so compare accuracy,
  not minutes. Both are below the 90 % target: it needs ~20
  epochs of this net, a ~1.5x faster step than XLA:CPU's convolutions allow (docs/cifar10.md).
"""
from __future__ import annotations

from jcv.train import Config, cli, loop

# airbench's hyperparameters are "per 1024 examples" on a summed loss, with the step size
# decoupled from the momentum; on jcv's mean loss they become:
MOMENTUM = 0.85
LR_PER_1024 = 11.5 / (1 + 1 / (1 - MOMENTUM))  # 1.5: mean-loss learning rate at batch 1024
L2 = 0.0153 / 11.5                               # lambda of lambda/2 ||w||^2 (airbench's wd)


def _lr(batch_size: int) -> float:
  return LR_PER_1024 * batch_size / 1024


GPU = Config(
    dataset="cifar10",
    image_size=32,
    crop="none",
    host_flip="alternate",  # airbench's alternating flip, then a random translate on device
    augment=(("pad_crop", {"padding": 2, "mode": "reflect"}),),
    model="cifar_cnn",
    model_options={},
    dtype="bfloat16",
    label_smoothing=0.2,
    optimizer="sgd",
    momentum=MOMENTUM,
    nesterov=True,
    learning_rate=_lr(1024),
    weight_decay=L2,
    weight_decay_mode="l2",
    schedule="triangle",
    onecycle_pct_start=0.23,
    onecycle_div_factor=1 / 0.2,
    onecycle_final_div_factor=0.2 / 0.07,
    lr_multipliers={r"bn\d/bias$": 64.0},
    freeze=(r"^whiten/kernel$",),
    epochs=10,
    batch_size=1024,
    eval_batch_size=1000,
    tta_flip=True,
    tta_translate=1,
    lookahead_every=5,
    log_every=10,
)

# Half width (4x fewer FLOPs), batch 128 (faster per image on a 2-core CPU than 256 or 512),
# and as many epochs as fit in 20 minutes there. See docs/cifar10.md for the runs behind it.
CPU_SGD = GPU.replace(
    model_options={"width": 0.5},
    dtype="float32",
    epochs=12,
    batch_size=128,
    learning_rate=_lr(128),
    eval_batch_size=1000,
    eval_every=12,
)

# airbench94_muon (Jordan 2024: 94.01% in 8 epochs instead of airbench94's 9.9): Muon for the
# conv kernels (renormalised every step), SGD for the head and BN biases (airbench94's head
# rate, biases at 0.053 per example), a linear decay from the peak, the whitening bias trained
# for the first 3 epochs only, no lookahead. Muon's rate and momentum were chosen for batch 128
# on the 45k/5k split (docs/cifar10.md); 13 epochs is what fits in 20 minutes with two XLA CPU
# devices per core (11 with one).
CPU = CPU_SGD.replace(
    optimizer="muon",
    muon_learning_rate=0.06,
    muon_momentum=0.6,
    muon_ns_steps=3,
    muon_normalize_weights=True,
    schedule="linear",
    lr_multipliers={r"bn\d/bias$": 36.0, r"^whiten/bias$": 36.0},
    group_epochs={r"^whiten/bias$": 3},
    lookahead_every=0,
    epochs=13,
    eval_every=13,
    # BN running averages at momentum 0.6 and batch 128 cover ~300 images: re-average them over
    # 10k training images at the end (6 s; validation 88.66 -> 88.90 %, docs/cifar10.md).
    bn_recompute_images=10000,
)

PRESETS = {"cpu": CPU, "cpu_sgd": CPU_SGD, "gpu": GPU}


def fit_kwargs(config: Config) -> dict:
  """The training source, and the model with its first layer whitened on that source."""
  from jcv.data import sources
  from jcv.models.cifar import whitening_init_from_source
  train_source = sources.resolve(loop.source_spec(config, config.train_split), split=config.train_split,
                                 data_dir=config.data_dir, val_fraction=config.val_fraction,
                                 seed=config.seed)
  num_classes = config.num_classes or len(train_source.class_names)
  model = loop.build_model(config, num_classes)
  model = model.clone(whiten_init=whitening_init_from_source(
      train_source, mean=config.mean, std=config.std, kernel_size=model.whiten_kernel_size))
  return {"train_source": train_source, "model": model}


def main(argv=None) -> dict:
  """Parses the shared flags, whitens the first layer from the data and runs ``fit``.

  XLA:CPU runs each convolution on one core: two CPU devices per core and the data-parallel
  step keep them all busy (554 -> 618 img/s over one per core on 2 cores; an accelerator run
  ignores the extra CPU devices). ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` wins.
  """
  return cli.run(argv, presets=PRESETS, default_preset="cpu", description=__doc__,
                 fit_kwargs=fit_kwargs, host_devices="cores", devices_per_core=2)


if __name__ == "__main__":
  main()
