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

from jcv.train import Config, Muon, Phase, cli, evaluation, fit  # noqa: E402
from jcv.train.config import CONFIG_FORMAT  # noqa: E402
from jcv.train.step import predict_logits  # noqa: E402
from run_tiny import BASE  # noqa: E402
from tiny import random_images  # noqa: E402

CLASSES = ["cat", "dog", "fox"]


def test_flags_map_to_config_fields():
  presets = {"small": Config(run={"length": "3 epochs"}, model={"name": "resnet20"})}
  parser = cli.make_parser(presets=presets, default_preset="small")
  args = parser.parse_args(["--workdir", "w", "--data-dir", "d", "--epochs", "5",
                            "--batch-size", "64", "--seed", "3", "--parallel", "pmap",
                            "--checkpoint-every", "9", "--set", "augment.label_smoothing=0.1",
                            "--set", "augment.ops=['flip', ('pad_crop', {'padding': 2})]",
                            "--set", "optim.name=adamw", "--set", "optim.freeze=('backbone',)",
                            "--set", "optim.muon.momentum=0.6"])
  cfg = cli.config_from_args(args, presets=presets)
  assert (cfg.model.name, cfg.data.data_dir, cfg.run.length, cfg.data.batch_size, cfg.run.seed, cfg.run.parallel,
          cfg.run.checkpoint_every) == ("resnet20", "d", "5 epochs", 64, 3, "pmap", "9 steps")
  assert cfg.augment.label_smoothing == 0.1 and cfg.optim.name == "adamw" and cfg.optim.freeze == ("backbone",)
  assert cfg.augment.ops == ("flip", ("pad_crop", {"padding": 2})) and cfg.optim.muon == Muon(momentum=0.6)
  assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  # --steps N: run.length in steps (after --epochs).
  steps = cli.config_from_args(parser.parse_args(["--workdir", "w", "--epochs", "5", "--steps", "7"]), presets=presets)
  assert steps.run.length == "7 steps"


def test_epochs_and_steps_flags_with_phases():
  phased = Config(run={"length": "20 epochs", "phases": (Phase(length="15 epochs", trainable="head"),
                                                        Phase(length="5 epochs", learning_rate=0.01))})
  parser = cli.make_parser()
  cfg = cli.apply_args(phased, parser.parse_args(["--workdir", "w", "--epochs", "8"]))
  assert cfg.run.length == "8 epochs" and [p.length for p in cfg.run.phases] == ["6 epochs", "2 epochs"]
  cfg = cli.apply_args(phased, parser.parse_args(["--workdir", "w", "--steps", "30"]))
  assert cfg.run.length == "30 steps" and cfg.run.phases == phased.run.phases  # a budget the phases spend in order
  cfg = cli.apply_args(phased, parser.parse_args(["--workdir", "w", "--set", 'run.phases.0.length="2 epochs"',
                                                  "--set", "run.phases.1.trainable=3"]))
  assert [(p.length, p.trainable) for p in cfg.run.phases] == [("2 epochs", "head"), ("5 epochs", 3)]


def test_bad_flags_raise_clear_errors():
  parser = cli.make_parser()
  parse = lambda *a: cli.config_from_args(parser.parse_args(["--workdir", "w", *a]))
  with pytest.raises(ValueError, match="unknown field 'learning_rat' \\(did you mean 'learning_rate'\\?\\)"):
    parse("--set", "optim.learning_rat=0.1")
  with pytest.raises(ValueError, match="unknown section 'learning_rate' \\(did you mean 'optim.learning_rate'\\?\\)"):
    parse("--set", "learning_rate=0.1")
  with pytest.raises(ValueError, match="section.field=value"):
    parse("--set", "oops")
  with pytest.raises(ValueError, match="run.parallel must be one of"):
    parse("--set", "run.parallel=tpu")
  with pytest.raises(ValueError, match="optim.b1 is an option of adamw, lamb, not of optim.name='sgd'"):
    parse("--set", "optim.b1=0.8")
  with pytest.raises(SystemExit) as e:  # cli.run: usage and the message, exit status 2
    cli.run(["--workdir", "w", "--set", "seed=1"])
  assert e.value.code == 2


def test_print_config_prints_the_nested_json(capsys):
  out = cli.run(["--workdir", "w", "--print-config", "--steps", "3", "--set", "optim.learning_rate=0.05"])
  printed = json.loads(capsys.readouterr().out)
  assert printed["format"] == CONFIG_FORMAT and printed["optim"]["learning_rate"] == 0.05
  assert printed["run"]["length"] == "3 steps" and Config.from_dict(printed) == out["config"]


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
  cfg = BASE.replace(data={"dataset": str(folder), "cache": False, "batch_size": 8},
                     run={"length": "3 steps", "plots": False}, evaluation={"batch_size": 8})
  fit(cfg, workdir=run)
  assert json.loads((run / "class_names.json").read_text()) == CLASSES

  out = _jcv("evaluate", "--workdir", run, "--data-dir", folder, "--split", "test")
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(got) == {"top1", "top5", "loss", "n"} and got["n"] == 13

  # Reference: the same checkpoint applied to the 13 decoded files at once, numpy metrics.
  config, names, state, _ = evaluation.load_run(run)
  files = sorted((folder / "test").rglob("*.png"))
  images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
  labels = np.array([names.index(f.parent.name) for f in files])
  logits = np.asarray(predict_logits(state, images, mean=config.data.mean, std=config.data.std), np.float64)
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
  parser = cli.make_parser("what it runs", presets={"cpu": Config(run={"length": "3 epochs"})},
                           default_workdir="runs/x", helps={"epochs": "epochs of each variant"})
  parser.set_defaults(batch_size=32, seed=0)
  parser.add_argument("--variant", default="all")
  args = parser.parse_args(["--variant", "one", "--steps", "4"])
  assert (args.workdir, args.variant, args.steps, args.batch_size, args.preset) == ("runs/x", "one", 4, 32, None)
  cfg = cli.apply_args(Config(run={"length": "3 epochs"}, data={"batch_size": 128}), args)
  assert (cfg.run.length, cfg.data.batch_size, cfg.run.seed) == ("4 steps", 32, 0)
  text = " ".join(parser.format_help().split())
  assert "epochs of each variant" in text and "(default: runs/x)" in text and "(default: 32)" in text
  assert "(default: 0)" in text and "cpu: model.name=resnet20, data.image_size=32, run.length=3 epochs" in text
  assert cli.fit_only_flags(parser.parse_args(["--set", "a.b=1", "--parallel", "pmap"])) == ["--parallel", "--set"]
  with pytest.raises(ValueError, match="unknown shared flag"):
    cli.make_parser(helps={"epoch": "typo"})


def test_run_passes_the_final_config_to_a_fit_kwargs_function(tmp_path, capsys):
  from tiny import array_sources
  train, evaluation = array_sources(64, 16)
  seen = []

  def fit_kwargs(config):
    seen.append(config)
    return {"train_source": train, "eval_source": evaluation}

  results = cli.run(["--workdir", str(tmp_path), "--steps", "2", "--set", "augment.label_smoothing=0.1"],
                    base=BASE, fit_kwargs=fit_kwargs)
  assert [(c.run.length, c.augment.label_smoothing) for c in seen] == [("2 steps", 0.1)]
  assert results["steps"] == 2
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 2


def test_eval_view_size_and_crop_fraction_reach_evaluate_and_predict(tmp_path):
  """A run with evaluation.image_size=12, crop_fraction=1.0 on non-square files: `jcv evaluate`
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
  cfg = BASE.replace(data={"dataset": str(folder), "cache": False, "batch_size": 8}, run={"length": "2 steps"},
                     evaluation={"batch_size": 8, "image_size": 12, "crop_fraction": 1.0})
  fit(cfg, workdir=run)
  config, names, state, _ = evaluation.load_run(run)
  assert (config.evaluation.image_size, config.evaluation.crop_fraction) == (12, 1.0)
  files = sorted((folder / "test").rglob("*.png"))
  raw = [np.asarray(Image.open(f).convert("RGB")) for f in files]
  views = np.stack([transforms.eval_resize_crop(im, 12, crop_fraction=1.0) for im in raw])
  default = np.stack([transforms.eval_resize_crop(im, 12) for im in raw])
  assert views.shape == (9, 12, 12, 3) and not np.array_equal(views, default)  # the option matters
  labels = np.array([names.index(f.parent.name) for f in files])
  logits = np.asarray(predict_logits(state, views, mean=config.data.mean, std=config.data.std), np.float64)
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


def test_a_run_folder_of_the_flat_config_is_refused_in_one_line(tmp_path, capsys):
  """A run folder written by jcv 0.1.0 (flat config in run.json and config.json) is not resumed."""
  from tiny import array_sources
  train, evaluation_src = array_sources(64, 16)
  kwargs = {"train_source": train, "eval_source": evaluation_src}
  argv = ["--workdir", str(tmp_path), "--steps", "2"]
  cli.run(argv, base=BASE, fit_kwargs=kwargs)
  flat = {"model": "advanced_cnn", "image_size": 8, "batch_size": 16, "steps": 2, "optimizer": "sgd"}
  record = json.loads((tmp_path / "run.json").read_text())
  (tmp_path / "run.json").write_text(json.dumps({**record, "config": flat}))
  (tmp_path / "config.json").write_text(json.dumps(flat))
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli.run(argv, base=BASE, fit_kwargs=kwargs)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "\n" not in err and "written by jcv 0.1.0" in err and "--restart" in err
