"""experiments/cifar10.py as a real subprocess: a few steps on a slice of the real CIFAR-10 JPEGs.

Checks the run's outputs, that the first layer holds the whitening filters of the training
images (computed independently here) and stayed frozen, and that the presets are what the
docs say.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from script_cache import private_cache

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "cifar10.py"


def _load_script():
  import importlib.util
  spec = importlib.util.spec_from_file_location("cifar10_experiment", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_presets_follow_airbench():
  exp = _load_script()
  gpu, cpu, muon = exp.PRESETS["gpu"], exp.PRESETS["cpu_sgd"], exp.PRESETS["cpu"]
  assert gpu.model.name == cpu.model.name == muon.model.name == "cifar_cnn"
  # airbench94: lr 11.5 per 1024 examples with momentum 0.85 -> 1.5 on a mean loss at batch 1024.
  assert gpu.data.batch_size == 1024 and gpu.optim.learning_rate == pytest.approx(1.5)
  assert cpu.optim.learning_rate == pytest.approx(1.5 * cpu.data.batch_size / 1024)
  assert gpu.optim.weight_decay == pytest.approx(0.0153 / 11.5) and gpu.optim.weight_decay_mode == "l2"
  assert gpu.augment.label_smoothing == 0.2 and gpu.evaluation.tta_flip and gpu.optim.freeze == (r"^whiten/kernel$",)
  for c in (cpu, gpu, muon):
    c.validate()
  # The group regexes hit exactly the parameters airbench treats specially.
  import jax
  import jax.numpy as jnp
  import jcv.models as M
  from jcv.train import Init, Lookahead, Whiten, optim
  model = M.create("cifar_cnn", **cpu.model.options)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  labels = optim.param_labels(params, freeze=cpu.optim.freeze, lr_multipliers=cpu.optim.lr_multipliers)
  flat = {path: label for path, label in zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(labels))}
  assert {p for p, l in flat.items() if l == optim.FROZEN} == {"whiten/kernel"}
  assert {p for p, l in flat.items() if l == "lr0"} == {f"block{i}/bn{j}/bias" for i in (1, 2, 3) for j in (1, 2)}
  decayed = jax.tree.leaves(optim.decay_mask(params))
  assert sum(decayed) == 8  # the 6 block convs, the head and the (frozen) whitening kernel
  # airbench94_muon: Muon takes the 6 block convs, the whitening bias stops after 3 epochs.
  assert muon.optim.muon is not None and muon.optim.muon.normalize_weights and muon.optim.lookahead is None
  assert gpu.optim.muon is None and gpu.optim.lookahead == Lookahead(every=5)
  assert gpu.init == Init(whiten=Whiten(num_images=5000))  # the first layer is a declared init step
  labels = optim.param_labels(params, freeze=muon.optim.freeze, lr_multipliers=muon.optim.lr_multipliers, muon=True)
  flat = {path: label for path, label in zip(jax.tree.leaves(optim.param_paths(params)), jax.tree.leaves(labels))}
  assert {p for p, l in flat.items() if l == optim.MUON} == {f"block{i}/conv{j}/kernel" for i in (1, 2, 3)
                                                             for j in (1, 2)}
  assert {p for p, l in flat.items() if l == "lr1"} == {"whiten/bias"} and flat["head/kernel"] == optim.DEFAULT
  assert muon.optim.group_lengths == {r"^whiten/bias$": "3 epochs"}


def test_smoke_run_whitens_and_trains(shared_dir, tmp_path):
  data = shared_dir / "data" / "cifar10"
  workdir = tmp_path / "run"
  env = dict(os.environ, JCV_CACHE_DIR=private_cache(tmp_path), PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs it
  cmd = [sys.executable, str(SCRIPT), "--preset", "cpu", "--data-dir", str(data),
         "--workdir", str(workdir), "--steps", "3", "--batch-size", "32", "--no-progress",
         "--set", "data.val_fraction=0.99",           # carve: "train" keeps a stratified 1 % (500 images)
         "--set", "data.eval_split='test[:64]'", "--set", "evaluation.batch_size=32",
         "--set", "model.options={'width': 0.25}", "--set", "run.plots=False"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary["steps"] == 3 and summary["final_eval"]["n"] == 64
  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == 3 and np.isfinite(results["final"]["train"]["loss"])
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["name"] == "cifar_cnn" and config["model"]["options"] == {"width": 0.25}

  # The checkpoint's first layer = whitening filters of the first 5,000 training images
  # (here all 500 of the carved slice), recomputed independently, and unchanged by training.
  from jcv.data import sources
  from jcv.models import cifar
  from jcv.train import evaluation
  train = sources.image_folder(data, split="train", val_fraction=0.99, seed=0,
                               cache_dir=tmp_path / "cache")
  images = np.stack([train[i]["image"] for i in range(len(train))])
  assert len(images) == 500
  x = (images / 255.0 - np.asarray(config["data"]["mean"])) / np.asarray(config["data"]["std"])
  want = cifar.whitening_kernel(x)
  _, class_names, state, _ = evaluation.load_run(workdir, which="latest")
  assert len(class_names) == 10
  np.testing.assert_allclose(np.asarray(state.params["whiten"]["kernel"]), want, rtol=1e-4, atol=1e-4)
  assert int(state.step) == 3
