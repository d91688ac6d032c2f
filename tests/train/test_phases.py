"""fit's regimes as config: phases run in order from each other's weights, init_from is part
of the config (config.json alone reproduces a run), pretrained weights and their preprocessing."""
import json

import jax
import numpy as np
from PIL import Image

from jcv.train import Config, evaluation, fit, init_from
from run_tiny import BASE
from tiny import array_sources, random_images


def _params(workdir):
  return jax.device_get(evaluation.load_run(workdir, which="latest")[2].params)


def test_phases_continue_from_the_previous_phase(tmp_path):
  train, ev = array_sources(64, 16)
  one = BASE.replace(epochs=1, eval_split="", model_options={**BASE.model_options, "dropout_rate": 0.0})
  fit(one, workdir=tmp_path / "one", train_source=train, eval_source=ev)
  # Phase 2 at learning rate 0 leaves phase 1's parameters as they are.
  two = one.replace(epochs=2, phases=({"epochs": 1}, {"epochs": 1, "learning_rate": 0.0}))
  results = fit(two, workdir=tmp_path / "two", train_source=train, eval_source=ev)
  assert [p["steps"] for p in results["phases"]] == [4, 4] and results["steps"] == 8
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "two"), _params(tmp_path / "one"))
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "two" / "phases" / "0"), _params(tmp_path / "one"))
  saved = Config.from_dict(json.loads((tmp_path / "two" / "config.json").read_text()))
  assert saved == two
  records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [4, 8]
  assert [r["phase"] for r in records if r["split"] == "train"] == [0, 1]
  # Re-running resumes every phase at its end: nothing trains again, the run folder stays.
  again = fit(two, workdir=tmp_path / "two", train_source=train, eval_source=ev)
  assert again["steps"] == 8 and again["final"]["eval"] == results["final"]["eval"]
  jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "two"), _params(tmp_path / "one"))
  # A steps budget is shared out in phase order: phase 2 gets what phase 1 leaves.
  short = fit(two.replace(steps=6), workdir=tmp_path / "short", train_source=train, eval_source=ev)
  assert [p["steps"] for p in short["phases"]] == [4, 2]


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
  config = Config(dataset=str(data), eval_split="", image_size=32, model="cifar_cnn",
                  model_options={"widths": (8, 8, 8)}, init_from={"whiten": {"num_images": 32}},
                  freeze=(r"^whiten/kernel$",), batch_size=16, steps=3, augment=("flip",), optimizer="sgd",
                  learning_rate=0.05, source_options={"cache": False}, progress=False, plots=False,
                  compilation_cache=None)
  fit(config, workdir=tmp_path / "a")
  again = Config.from_dict(json.loads((tmp_path / "a" / "config.json").read_text()))
  assert again == config
  fit(again, workdir=tmp_path / "b")
  a, b = _params(tmp_path / "a"), _params(tmp_path / "b")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  from jcv.data import sources
  from jcv.models import cifar
  train = sources.image_folder(data, split="train", cache=False)
  x = (np.stack([train[i]["image"] for i in range(32)]) / 255.0 - np.asarray(config.mean)) / np.asarray(config.std)
  np.testing.assert_allclose(a["whiten"]["kernel"], cifar.whitening_kernel(x), rtol=1e-5, atol=1e-5)


def test_init_from_pretrained_and_its_preprocessing(shared_dir):
  import jcv.weights
  weights = str(shared_dir / "weights" / "mobilenet_v2_1.0_224_backbone.npz")
  config = Config(model="mobilenet_v2", num_classes=3, init_from={"pretrained": {"weights": weights}},
                  mean="pretrained", std="pretrained", seed=2)
  resolved = init_from.resolve_preprocessing(config)
  assert resolved.mean == resolved.std == (0.5, 0.5, 0.5)
  model, want = jcv.weights.pretrained("mobilenet_v2", weights, num_classes=3, seed=2)
  got = init_from.initial_variables(resolved, model)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert init_from.initial_variables(Config(), model) is None
  import pytest
  with pytest.raises(ValueError, match="unknown init_from step"):
    Config(init_from={"imagenet": {}}).validate()
  with pytest.raises(ValueError, match="needs \"weights\""):
    init_from.initial_variables(config.replace(init_from={"pretrained": {}}), model)
