"""The shared experiment flags, and ``python -m jcv evaluate|predict`` as real subprocesses."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "train"))

from jcv.train import Config, cli, loop, predict_logits  # noqa: E402
from run_tiny import BASE  # noqa: E402
from tiny import random_images  # noqa: E402

CLASSES = ["cat", "dog", "fox"]


def test_flags_map_to_config_fields():
  presets = {"small": Config(epochs=3, model="resnet20")}
  parser = cli.make_parser(presets=presets, default_preset="small")
  args = parser.parse_args(["--workdir", "w", "--data-dir", "d", "--epochs", "5", "--steps", "7",
                            "--batch-size", "64", "--seed", "3", "--parallel", "pmap",
                            "--checkpoint-every", "9", "--set", "label_smoothing=0.1",
                            "--set", "augment=['flip', ('pad_crop', {'padding': 2})]",
                            "--set", "optimizer=adamw", "--set", "freeze=('backbone',)"])
  cfg = cli.config_from_args(args, presets=presets)
  assert (cfg.model, cfg.data_dir, cfg.epochs, cfg.steps, cfg.batch_size, cfg.seed, cfg.parallel,
          cfg.checkpoint_every) == ("resnet20", "d", 5, 7, 64, 3, "pmap", 9)
  assert cfg.label_smoothing == 0.1 and cfg.optimizer == "adamw" and cfg.freeze == ("backbone",)
  assert cfg.augment == ("flip", ("pad_crop", {"padding": 2}))
  assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  bare = Config().set(["freeze=backbone", "augment=flip", "data_dir=../shared/data/x", "steps=None"])
  assert (bare.freeze, bare.augment, bare.data_dir, bare.steps) == (("backbone",), ("flip",), "../shared/data/x", None)


def test_bad_flags_raise_clear_errors():
  parser = cli.make_parser()
  with pytest.raises(ValueError, match="unknown config field 'learning_rat'"):
    cli.config_from_args(parser.parse_args(["--workdir", "w", "--set", "learning_rat=0.1"]))
  with pytest.raises(ValueError, match="key=value"):
    cli.config_from_args(parser.parse_args(["--workdir", "w", "--set", "oops"]))
  with pytest.raises(ValueError, match="parallel must be one of"):
    cli.config_from_args(parser.parse_args(["--workdir", "w", "--set", "parallel=tpu"]))


def _write_folder(root: pathlib.Path):
  for split, n, seed in (("train", 24, 0), ("test", 13, 1)):
    images, labels = random_images(n, num_classes=3, seed=seed)
    for i, (img, lab) in enumerate(zip(images, labels)):
      d = root / split / CLASSES[lab]
      d.mkdir(parents=True, exist_ok=True)
      Image.fromarray(img).save(d / f"{i:03d}.png")


def _jcv(*args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jcv", *map(str, args)], capture_output=True, text=True,
                        env=env, timeout=600)


def test_evaluate_and_predict_commands(tmp_path):
  folder = tmp_path / "data"
  _write_folder(folder)
  run = tmp_path / "run"
  cfg = BASE.replace(dataset=str(folder), source_options={"cache": False}, batch_size=8, steps=3,
                     eval_batch_size=8, plots=False)
  loop.fit(cfg, workdir=run)
  assert json.loads((run / "class_names.json").read_text()) == CLASSES

  out = _jcv("evaluate", "--workdir", run, "--data-dir", folder, "--split", "test")
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(got) == {"top1", "top5", "loss", "n"} and got["n"] == 13

  # Reference: the same checkpoint applied to the 13 decoded files at once, numpy metrics.
  config, names, state, _ = loop.load_run(run)
  files = sorted((folder / "test").rglob("*.png"))
  images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
  labels = np.array([names.index(f.parent.name) for f in files])
  logits = np.asarray(predict_logits(state, images, mean=config.mean, std=config.std), np.float64)
  assert got["top1"] == pytest.approx(np.mean(logits.argmax(1) == labels), abs=1e-6)
  logp = logits - logits.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  assert got["loss"] == pytest.approx(-np.mean(logp[np.arange(13), labels]), rel=1e-5)

  out = _jcv("predict", "--workdir", run, files[0], files[1], "--plot", tmp_path / "predictions.png")
  assert out.returncode == 0, out.stderr[-3000:]
  with Image.open(tmp_path / "predictions.png") as png:  # one panel per image, side by side
    assert png.format == "PNG" and png.size == (1200, 260)
    assert np.asarray(png.convert("L")).std() > 10
  rows = [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]
  assert [r["file"] for r in rows] == [str(files[0]), str(files[1])]
  probs = np.exp(logp[:2])
  for row, p in zip(rows, probs):
    assert [name for name, _ in row["top"]] == [names[i] for i in np.argsort(-p)[:5]]
    np.testing.assert_allclose([q for _, q in row["top"]], np.sort(p)[::-1][:5], rtol=1e-4)


def test_evaluate_on_a_non_run_folder_fails_clearly(tmp_path):
  out = _jcv("evaluate", "--workdir", tmp_path, "--data-dir", tmp_path)
  assert out.returncode == 2
  assert "no checkpoints/ folder" in out.stderr


def test_summary_command_prints_card_and_layers(capsys):
  from jcv.__main__ import main
  assert main(["summary", "resnet20"]) == 0
  out = capsys.readouterr().out
  assert "269,722" in out and "stage3_block3/conv2" in out
  assert main(["summary", "no_such_model"]) == 2
  assert "available: " in capsys.readouterr().err


def test_script_parser_builds_on_the_shared_one():
  with pytest.raises(SystemExit):  # --workdir is required unless the script gives a default
    cli.make_parser().parse_args([])
  parser = cli.make_parser("what it runs", presets={"cpu": Config(epochs=3)}, default_workdir="runs/x",
                           helps={"epochs": "epochs of each variant"})
  parser.set_defaults(batch_size=32, seed=0)
  parser.add_argument("--variant", default="all")
  args = parser.parse_args(["--variant", "one", "--steps", "4"])
  assert (args.workdir, args.variant, args.steps, args.batch_size, args.preset) == ("runs/x", "one", 4, 32, None)
  cfg = cli.apply_args(Config(epochs=3, batch_size=128), args)
  assert (cfg.epochs, cfg.steps, cfg.batch_size, cfg.seed) == (3, 4, 32, 0)
  text = " ".join(parser.format_help().split())
  assert "epochs of each variant" in text and "(default: runs/x)" in text and "(default: 32)" in text
  assert "(default: 0)" in text and "cpu: model=resnet20, image_size=32, epochs=3" in text
  assert cli.fit_only_flags(parser.parse_args(["--set", "a=1", "--parallel", "pmap"])) == ["--parallel", "--set"]
  with pytest.raises(ValueError, match="unknown shared flag"):
    cli.make_parser(helps={"epoch": "typo"})


def test_run_passes_the_final_config_to_a_fit_kwargs_function(tmp_path, capsys):
  from tiny import array_sources
  train, evaluation = array_sources(64, 16)
  seen = []

  def fit_kwargs(config):
    seen.append(config)
    return {"train_source": train, "eval_source": evaluation}

  results = cli.run(["--workdir", str(tmp_path), "--steps", "2", "--set", "label_smoothing=0.1"],
                    base=BASE, fit_kwargs=fit_kwargs)
  assert [(c.steps, c.label_smoothing) for c in seen] == [(2, 0.1)]
  assert results["steps"] == 2
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


def test_eval_view_size_and_crop_fraction_reach_evaluate_and_predict(tmp_path):
  """A run with eval_image_size=12, eval_crop_fraction=1.0 on non-square files: `jcv evaluate`
  and `jcv predict` see exactly transforms.eval_resize_crop(image, 12, crop_fraction=1.0)."""
  from jcv.data import transforms
  folder = tmp_path / "data"
  rng = np.random.default_rng(0)
  for split, n in (("train", 24), ("test", 9)):
    for i in range(n):
      d = folder / split / CLASSES[i % 3]
      d.mkdir(parents=True, exist_ok=True)
      Image.fromarray(rng.integers(0, 256, (10, 16, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
  run = tmp_path / "run"
  cfg = BASE.replace(dataset=str(folder), source_options={"cache": False}, batch_size=8, steps=2,
                     eval_batch_size=8, eval_image_size=12, eval_crop_fraction=1.0)
  loop.fit(cfg, workdir=run)
  config, names, state, _ = loop.load_run(run)
  assert (config.eval_image_size, config.eval_crop_fraction) == (12, 1.0)
  files = sorted((folder / "test").rglob("*.png"))
  raw = [np.asarray(Image.open(f).convert("RGB")) for f in files]
  views = np.stack([transforms.eval_resize_crop(im, 12, crop_fraction=1.0) for im in raw])
  default = np.stack([transforms.eval_resize_crop(im, 12) for im in raw])
  assert views.shape == (9, 12, 12, 3) and not np.array_equal(views, default)  # the option matters
  labels = np.array([names.index(f.parent.name) for f in files])
  logits = np.asarray(predict_logits(state, views, mean=config.mean, std=config.std), np.float64)
  logp = logits - logits.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))

  out = _jcv("evaluate", "--workdir", run, "--split", "test", "--data-dir", folder)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["loss"] == pytest.approx(-np.mean(logp[np.arange(9), labels]), rel=1e-5)
  from jcv.__main__ import predict
  rows = predict(run, files[:2])
  for row, p in zip(rows, np.exp(logp[:2])):
    np.testing.assert_allclose([q for _, q in row["top"]], np.sort(p)[::-1][:3], rtol=1e-4)
