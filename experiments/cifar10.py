"""CIFAR-10 from scratch: the airbench recipe (Jordan 2024) on jcv.

  python experiments/cifar10.py --preset cpu --data-dir ../shared/data/cifar10 --workdir runs/cifar10_cpu
  python experiments/cifar10.py --preset gpu --data-dir ../shared/data/cifar10 --workdir runs/cifar10_gpu
  python experiments/cifar10.py --preset baseline --data-dir ../shared/data/cifar10 --workdir runs/cifar10_baseline
  python experiments/cifar10.py ... --set data.val_fraction=0.1 --set data.eval_split=val   # tune on 45k/5k

``cifar_cnn`` with its first layer whitened from 5,000 training images (``init.whiten``) and
frozen, label smoothing 0.2, alternating flips + translate-by-2, flip + translate TTA, and
airbench94's Nesterov SGD + lookahead (``gpu``, ``cpu_sgd``) or airbench94_muon's Muon
(``cpu``, with precise BN over 10k images; bfloat16 where the CPU has AVX512_BF16 or AMX,
``model.dtype="auto"``). ``cpu`` takes about 8-15 min on a 2-core CPU (docs/cifar10.md). ``baseline``: homework 2's textbook CNN, Adam, flip + shift.

Measured accuracy and time: docs/cifar10.md.
"""
from __future__ import annotations

from jcv.train import (Augment, Config, Data, Evaluation, Init, Lookahead, Model, Muon, Optim, Run, Schedule,
                       Whiten, cli)

# airbench's hyperparameters are "per 1024 examples" on a summed loss; on jcv's mean loss:
MOMENTUM = 0.85
LR_PER_1024 = 11.5 / (1 + 1 / (1 - MOMENTUM))  # 1.5: mean-loss learning rate at batch 1024
L2 = 0.0153 / 11.5                               # lambda of lambda/2 ||w||^2 (airbench's wd)

GPU = Config(
    data=Data(dataset="cifar10", image_size=32, crop="none", batch_size=1024,
              host_flip="alternate"),  # airbench's alternating flip, then a random translate on device
    augment=Augment(ops=(("pad_crop", {"padding": 2, "mode": "reflect"}),), label_smoothing=0.2),
    model=Model(name="cifar_cnn", dtype="bfloat16"),
    init=Init(whiten=Whiten(num_images=5000)),  # first layer: whitening filters of the data
    optim=Optim(name="sgd", momentum=MOMENTUM, nesterov=True, learning_rate=LR_PER_1024, weight_decay=L2,
                weight_decay_mode="l2", freeze=(r"^whiten/kernel$",), lr_multipliers={r"bn\d/bias$": 64.0},
                lookahead=Lookahead(every=5)),
    schedule=Schedule(name="triangle", pct_start=0.23, div_factor=1 / 0.2, final_div_factor=0.2 / 0.07),
    evaluation=Evaluation(batch_size=1000, tta_flip=True, tta_translate=1),
    run=Run(length="10 epochs", log_every="10 steps"),
)
# Half width, batch 128 (faster per image on a 2-core CPU than 256 or 512), 12 epochs.
CPU_SGD = GPU.replace(model={"options": {"width": 0.5}, "dtype": "float32"}, data={"batch_size": 128},
                      optim={"learning_rate": LR_PER_1024 * 128 / 1024}, run={"length": "12 epochs"},
                      evaluation={"every": "12 epochs"})
# airbench94_muon: Muon for the conv kernels (renormalised every step), SGD for the rest, a linear
# decay, the whitening bias trained for 3 epochs; BN statistics re-averaged over 10k images at the end.
# Width 0.75 (48, 192, 192), 8 epochs: chosen on the 45k/5k split (docs/cifar10.md).
CPU = CPU_SGD.replace(
    optim={"muon": Muon(learning_rate=0.06, momentum=0.6, ns_steps=3, normalize_weights=True), "lookahead": None,
           "lr_multipliers": {r"bn\d/bias$": 36.0, r"^whiten/bias$": 36.0},
           "group_lengths": {r"^whiten/bias$": "3 epochs"}},
    schedule=Schedule(name="linear"), model={"options": {"width": 0.75}, "dtype": "auto"}, run={"length": "8 epochs"},
    evaluation={"every": "8 epochs", "bn_recompute": "10000 examples"},
)
# Homework 2 as a student writes it: the textbook CNN (jcv.models.textbook), Adam at 1e-3, flips and shifts.
BASELINE = Config(augment=Augment(ops=("flip", ("shift", {"width": 0.1, "height": 0.1}))), model=Model(name="textbook_cnn"),
                  optim=Optim(name="adamw", learning_rate=1e-3, weight_decay=0.0), schedule=Schedule(name="constant"),
                  run=Run(length="15 epochs"))  # every other field: Config's defaults (CIFAR-10 at 32 px, batch 128)
PRESETS = {"cpu": CPU, "cpu_sgd": CPU_SGD, "gpu": GPU, "baseline": BASELINE}


def main(argv=None) -> dict:
  """Runs ``fit`` on the chosen preset with the shared flags, one XLA CPU device per core
  (docs/cifar10.md); an accelerator run ignores them."""
  return cli.run(argv, presets=PRESETS, default_preset="cpu", description=__doc__,
                 host_devices="cores")


if __name__ == "__main__":
  main()
