"""fit's regimes as config: phases run in order from each other's weights, the init section is part
of the config (config.json alone reproduces a run), pretrained weights and their preprocessing."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from jcv.train import Config, Phase, Pretrained, Whiten, evaluation, fit, init_from
from run_tiny import BASE
from tiny import array_sources, random_images


def _params(workdir):
  return jax.device_get(evaluation.load_run(workdir, which="latest")[2].params)


def test_phases_continue_from_the_previous_phase(tmp_path):
  train, ev = array_sources(64, 16)
  one = BASE.replace(run={"length": "1 epochs"}, data={"eval_split": ""},
                     model={"options": {**BASE.model.options, "dropout_rate": 0.0}})
  fit(one, workdir=tmp_path / "one", train_source=train, eval_source=ev)
  # Phase 2 at learning rate 0 leaves phase 1's parameters as they are.
  two = one.replace(run={"length": "2 epochs", "phases": (Phase(length="1 epochs"),
                                                         Phase(length="1 epochs", learning_rate=0.0))})
  results = fit(two, workdir=tmp_path / "two", train_source=train, eval_source=ev)
  assert [p["steps"] for p in results["phases"]] == [4, 4] and results["steps"] == 8
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "two"), _params(tmp_path / "one"))
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "two" / "phases" / "0"), _params(tmp_path / "one"))
  saved = json.loads((tmp_path / "two" / "config.json").read_text())
  assert saved["run"]["phases"][1] == {"length": "1 epochs", "trainable": None, "learning_rate": 0.0,
                                "backbone_lr_multiplier": None, "warmup": None}
  assert Config.from_dict(saved) == two
  records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [4, 8]
  assert [r["phase"] for r in records if r["split"] == "train"] == [0, 1]
  # Re-running resumes every phase at its end: nothing trains again, the run folder stays.
  again = fit(two, workdir=tmp_path / "two", train_source=train, eval_source=ev)
  assert again["steps"] == 8 and again["final"]["eval"] == results["final"]["eval"]
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "two"), _params(tmp_path / "one"))
  # A steps budget is shared out in phase order: phase 2 gets what phase 1 leaves, then none.
  short = fit(two.replace(run={"length": "6 steps"}), workdir=tmp_path / "short", train_source=train, eval_source=ev)
  assert [p["steps"] for p in short["phases"]] == [4, 2] and short["steps"] == 6
  shorter = fit(two.replace(run={"length": "3 steps"}), workdir=tmp_path / "shorter", train_source=train,
                eval_source=ev)
  assert [p["steps"] for p in shorter["phases"]] == [3] and shorter["steps"] == 3


def _image_folder(root, n=40, size=32):
  images, labels = random_images(n, size=size, num_classes=2, seed=4)
  for split, part in (("train", slice(0, 32)), ("test", slice(32, n))):
    for i in range(n)[part]:
      folder = root / split / f"c{labels[i]}"
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(images[i]).save(folder / f"{i}.png")
  return root


def test_config_json_alone_reproduces_a_run_with_an_init_step(tmp_path):
  data = _image_folder(tmp_path / "data")
  config = Config(data={"dataset": str(data), "eval_split": "", "image_size": 32, "batch_size": 16, "cache": False},
                  model={"name": "cifar_cnn", "options": {"widths": (8, 8, 8)}},
                  init={"whiten": Whiten(num_images=32)},
                  optim={"name": "sgd", "learning_rate": 0.05, "freeze": (r"^whiten/kernel$",)},
                  augment={"ops": ("flip",)},
                  run={"length": "3 steps", "progress": False, "plots": False, "compilation_cache": None})
  fit(config, workdir=tmp_path / "a")
  again = Config.from_dict(json.loads((tmp_path / "a" / "config.json").read_text()))
  assert again == config
  fit(again, workdir=tmp_path / "b")
  a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  from jcv.data import sources
  from jcv.models import cifar
  train = sources.image_folder(data, split="train", cache=False)
  images = np.stack([train[i]["image"] for i in range(32)]) / 255.0
  x = (images - np.asarray(config.data.mean)) / np.asarray(config.data.std)
  np.testing.assert_allclose(a["whiten"]["kernel"], cifar.whitening_kernel(x), rtol=1e-5, atol=1e-5)


def test_init_from_pretrained_and_its_preprocessing(shared_dir):
  import jcv.weights
  weights = str(shared_dir / "weights" / "mobilenet_v2_1.0_224_backbone.npz")
  config = Config(model={"name": "mobilenet_v2", "num_classes": 3}, init={"pretrained": Pretrained(weights=weights)},
                  data={"mean": "pretrained", "std": "pretrained"}, run={"seed": 2})
  resolved = init_from.resolve_preprocessing(config)
  assert resolved.data.mean == resolved.data.std == (0.5, 0.5, 0.5)
  assert init_from.resolve_preprocessing(resolved) is resolved  # numbers stay as they are
  model, want = jcv.weights.pretrained("mobilenet_v2", weights, num_classes=3, seed=2)
  got = init_from.initial_variables(resolved, model)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert init_from.initial_variables(Config(), model) is None
  with pytest.raises(ValueError, match="init: unknown field 'imagenet'"):
    Config(init={"imagenet": {}})
  with pytest.raises(ValueError, match="init.pretrained.weights: name a weights file"):
    config.replace(init={"pretrained": {}}).validate()
