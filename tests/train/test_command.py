"""``jcv train``: the config it chooses for a folder with and without splits or a tfds dataset,
one clear line (exit 2) for each kind of bad input, and real runs that `jcv evaluate` reads."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from script_cache import private_cache

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shared_dir):
  """PHOTOS/{train,test}/{cat,dog}/ with 16 + 4 real photos per class, and FLAT/{cat,dog}/."""
  root = tmp_path_factory.mktemp("photos")
  for split, n in (("train", 16), ("test", 4)):
    for cls in ("cat", "dog"):
      (root / "split" / split / cls).mkdir(parents=True)
      for f in sorted((shared_dir / "data" / "cats_vs_dogs" / split / cls).iterdir())[:n]:
        shutil.copy(f, root / "split" / split / cls / f.name)
  shutil.copytree(root / "split" / "train", root / "flat")
  return root


def _jcv(*args, cwd, timeout=600):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JCV_CACHE_DIR=private_cache(cwd))
  env.pop("XLA_FLAGS", None)  # as a user runs it: one XLA device per core
  return subprocess.run([sys.executable, "-m", "jcv", "train", *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def _config(*args, cwd) -> dict:
  out = _jcv(*args, "--print-config", cwd=cwd)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout)


def test_the_config_follows_the_folder_and_the_regime(photos, shared_dir, tmp_path):
  lite2 = shared_dir / "weights" / "efficientnet_lite2.npz"
  flat = _config("--data-dir", photos / "flat", "--workdir", tmp_path / "r", "--pretrained", "efficientnet_lite2",
                 "--weights", lite2, cwd=tmp_path)
  assert (flat["data"]["train_split"], flat["data"]["eval_split"], flat["data"]["val_fraction"]) == ("train", "val", 0.1)
  assert flat["model"]["name"] == "efficientnet_lite2" and flat["init"]["pretrained"]["weights"] == str(lite2)
  assert flat["init"]["trainable"] == "backbone" and flat["data"]["image_size"] == 176  # the fine-tuning recipe
  assert flat["run"]["length"] == "30 epochs"  # 28 images: at least 500 steps, at most 30 epochs
  assert flat["data"]["mean"] != "pretrained"  # the weights' preprocessing, resolved
  scratch = _config("--data-dir", photos / "split", "--workdir", tmp_path / "r", "--model", "resnet18",
                    "--epochs", "3", "--set", "optim.learning_rate=0.01", cwd=tmp_path)
  assert scratch["data"]["image_size"] == 224 and scratch["run"]["length"] == "3 epochs"  # the model card's size
  assert scratch["optim"]["learning_rate"] == 0.01 and scratch["data"]["val_fraction"] == 0.1


@pytest.mark.parametrize("case", ["unknown_model", "missing", "empty", "one_class", "not_images", "classes_differ",
                                  "no_weights", "no_ported_weights"])
def test_bad_input_is_one_line_and_exit_2(case, photos, tmp_path):
  folder, model = photos / "split", ("--model", "resnet18")
  if case == "missing":
    folder = tmp_path / "nowhere"
  elif case == "empty":
    folder = tmp_path / "empty"
    folder.mkdir()
  elif case == "one_class":
    folder = tmp_path / "one"
    shutil.copytree(photos / "flat" / "cat", folder / "cat")
  elif case == "not_images":
    folder = tmp_path / "text"
    for cls in ("a", "b"):
      (folder / cls).mkdir(parents=True)
      (folder / cls / "notes.txt").write_text("not an image")
  elif case == "classes_differ":
    folder = tmp_path / "differ"
    shutil.copytree(photos / "split", folder)
    (folder / "test" / "dog").rename(folder / "test" / "dogs")
  model = {"unknown_model": ("--model", "resnt18"), "no_weights": ("--pretrained", "mobilenet_v2"),
           "no_ported_weights": ("--pretrained", "resnet18", "--weights", "w.npz")}.get(case, model)
  out = _jcv("--data-dir", folder, "--workdir", tmp_path / "run", *model, "--steps", 1, cwd=tmp_path)
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  expected = {"unknown_model": "did you mean resnet18", "missing": "does not exist", "empty": "no class sub-folders",
              "one_class": "at least 2", "not_images": "no image files", "classes_differ": "dogs",
              "no_weights": "needs --weights", "no_ported_weights": "no pretrained weights known"}[case]
  assert expected in errors[0], errors[0]


def test_a_short_run_from_scratch_is_a_run_folder_with_its_test_result(photos, tmp_path):
  run = tmp_path / "run"
  out = _jcv("--data-dir", photos / "split", "--workdir", run, "--model", "cifar_cnn", "--image-size", 32,
             "--batch-size", 8, "--steps", 4, cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "trained 4 steps" in out.stdout and "test top-1" in out.stdout
  results = json.loads((run / "results.json").read_text())
  assert results["split"] == "test" and results["n"] == 8 and (run / "confusion.png").exists()
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  ev = subprocess.run([sys.executable, "-m", "jcv", "evaluate", "--workdir", str(run), "--data-dir",
                       str(photos / "split"), "--split", "test", "--checkpoint", "latest"],
                      env=env, capture_output=True, text=True, timeout=300)
  assert ev.returncode == 0 and json.loads(ev.stdout)["top1"] == pytest.approx(results["top1"]), ev.stderr[-2000:]


def test_minutes_sets_the_length_from_the_measured_step(photos, tmp_path):
  out = _jcv("--data-dir", photos / "flat", "--workdir", tmp_path / "run", "--model", "cifar_cnn", "--image-size",
             32, "--batch-size", 8, "--minutes", 0.5, "--print-config", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  length = json.loads(out.stdout[out.stdout.index("{"):])["run"]["length"]
  steps = int(length.split()[0])
  assert length.endswith(" steps") and steps > 4, length  # a small net takes well under a second a step
  assert f"so {steps} steps" in out.stdout


def test_a_tfds_dataset_by_name(photos, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from jcv.data import tfds_folder
  tfds_folder.prepare_image_folder_as_tfds(photos / "split", tmp_path / "tfds", name="cats_vs_dogs")
  config = _config("--tfds", "cats_vs_dogs", "--tfds-dir", tmp_path / "tfds", "--workdir", tmp_path / "r",
                   "--model", "cifar_cnn", cwd=tmp_path)
  assert (config["data"]["dataset"], config["data"]["data_dir"]) == ("cats_vs_dogs", str(tmp_path / "tfds"))
  assert (config["data"]["train_split"], config["data"]["eval_split"]) == ("train[10%:]", "train[:10%]")
  missing = _jcv("--tfds", "cats_vs_dogs", "--tfds-dir", tmp_path / "nothing", "--workdir", tmp_path / "r",
                 "--model", "cifar_cnn", "--print-config", cwd=tmp_path)
  assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_the_budget_times_a_pretrained_recipe_with_the_weights_preprocessing():
  from jcv.train import Model, budget, recipes
  # FINETUNE's mean/std are "pretrained": the timing resolves them as fit does.
  config = recipes.FINETUNE.replace(model=Model(name="mobilenet_v2"), data={"image_size": 32, "batch_size": 8})
  per_step, compile_s = budget.step_seconds(config, 2, steps=1)
  assert 0 < per_step < 60 and compile_s > 0
