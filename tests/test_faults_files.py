"""Fault injection (issue #16), in process: bad image files, NaN logits, bad weight files,
bad flags, the workdir lock and the resume check. The subprocess half is tests/train/test_faults.py."""
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jcv.data import pipeline, sources
from jcv.train import Config, losses, rundir
from jcv.train.classmap import align_classes


# ------------------------------------------------------------------ metrics that cannot be fooled


def test_topk_nan_logits_and_out_of_range_labels_are_misses():
  assert losses.topk_correct(jnp.full((2, 3), jnp.nan), jnp.array([0, 2]), k=1).tolist() == [0, 0]
  logits = jnp.array([[5.0, 1, 0], [5.0, 1, 0], [5.0, 1, 0], [jnp.inf, 1, 0]])
  assert losses.topk_correct(logits, jnp.array([0, 3, -1, 0]), k=5).tolist() == [1, 0, 0, 0]


def test_eval_step_with_nan_logits_counts_no_hit():
  from jcv.train import optim
  from jcv.train.state import create_train_state
  from jcv.train.step import eval_step
  import sys as _sys
  _sys.path.insert(0, os.path.join(os.path.dirname(__file__), "train"))
  from tiny import TinyCNN, random_images
  tx, _ = optim.make_optimizer(Config(), steps_per_epoch=1, total_steps=1)
  state = create_train_state(jax.random.key(0), TinyCNN(), tx, (1, 8, 8, 3))
  state = state.replace(params=jax.tree.map(lambda p: jnp.full_like(p, jnp.nan), state.params))
  images, labels = random_images(8)
  sums = eval_step(state, {"image": images, "label": labels})
  assert float(sums["top1"]) == 0 and float(sums["top5"]) == 0 and float(sums["count"]) == 8


def test_align_classes_maps_a_subset_by_name_and_refuses_unknown_classes(capsys):
  images = np.zeros((3, 4, 4, 3), np.uint8)
  sub = sources.ArraySource(images, [0, 1, 1], class_names=["cat", "airplane"])
  out = align_classes(sub, ["airplane", "bird", "cat"])
  assert out.labels.tolist() == [2, 0, 0] and out.class_names == ["airplane", "bird", "cat"]
  assert "mapped to the run's classes by name" in capsys.readouterr().err
  with pytest.raises(ValueError, match=r"\['dog'\] are not among the run's 3 classes"):
    align_classes(sources.ArraySource(images, [0, 1, 1], class_names=["cat", "dog"]), ["airplane", "bird", "cat"])


# ------------------------------------------------------------------ bad image files


def _folder(root, *, per_class=3, size=8):
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    (root / "train" / cls).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "train" / cls / f"{i}.png")
  return root


def test_bad_files_are_skipped_named_and_counted(tmp_path):
  root = _folder(tmp_path / "d")
  bird = root / "train" / "a"
  (bird / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
  (bird / "loop1.jpg").symlink_to(bird / "loop2.jpg")
  (bird / "loop2.jpg").symlink_to(bird / "loop1.jpg")
  (bird / "dir.jpg").mkdir()
  Image.new("L", (40, 40)).save(bird / "bomb.png")  # over max_pixels=1000 below
  bad = {"dangling.jpg", "loop1.jpg", "loop2.jpg", "dir.jpg", "bomb.png"}
  if os.getuid() != 0:  # root reads any file
    (bird / "locked.png").write_bytes((bird / "0.png").read_bytes())
    (bird / "locked.png").chmod(0)
    bad.add("locked.png")
  cached = sources.image_folder(root, split="train", cache=True, cache_dir=tmp_path / "c", max_pixels=1000)
  assert {os.path.basename(p) for p in cached.skipped} == bad and len(cached) == 6
  lazy = sources.image_folder(root, split="train", cache=False, max_pixels=1000)
  loader = pipeline.eval_loader(lazy, batch_size=len(lazy), image_size=8)
  it = iter(loader)
  batch = next(it)
  assert int(batch["mask"].sum()) == 6 and it.num_skipped == len(bad)
  with pytest.raises(sources.CorruptImageError, match="over the limit of 1000"):
    sources.decode_image(bird / "bomb.png", max_pixels=1000)


def test_empty_class_folder_missing_data_dir_and_split_are_clear_errors(tmp_path):
  root = _folder(tmp_path / "d")
  with pytest.raises(ValueError, match="does not exist"):
    sources.resolve("cifar10", split="train", data_dir=tmp_path / "nothere")
  with pytest.raises(ValueError, match="split 'test' not found in the image folder"):
    sources.resolve("cifar10", split="test", data_dir=root)
  (root / "train" / "c").mkdir()
  with pytest.raises(ValueError, match=r"class folder\(s\) \['c'\] .* hold no image files"):
    sources.image_folder(root, split="train", cache=False)


# ------------------------------------------------------------------ bad weight files


@pytest.mark.parametrize("kind", ["truncated", "random_npz", "random_h5", "nan", "pickled", "empty"])
def test_bad_weight_files_raise_one_clear_error_naming_the_file(tmp_path, kind, shared_dir):
  from jcv.weights import read_arrays
  good = shared_dir / "weights" / "mobilenet_v2_1.0_224_backbone.npz"
  path = tmp_path / ("w.h5" if kind == "random_h5" else "w.npz")
  if kind == "truncated":
    path.write_bytes(good.read_bytes()[:100_000])
  elif kind in ("random_npz", "random_h5"):
    path.write_bytes(np.random.default_rng(0).bytes(3000))
  elif kind == "nan":
    np.savez(path, a=np.array([1.0, np.nan], np.float32))
  elif kind == "pickled":
    np.savez(path, a=np.array([{"x": 1}], dtype=object))
  else:
    path.write_bytes(b"")
  with pytest.raises(ValueError) as info:
    read_arrays(path)
  assert str(path) in str(info.value) and "\n" not in str(info.value)


# ------------------------------------------------------------------ flags and CLI errors


def test_set_values_are_type_checked_against_the_field_type():
  with pytest.raises(ValueError, match="optim.learning_rate must be float, got the text 'abc'"):
    Config().set(["optim.learning_rate=abc"])
  with pytest.raises(ValueError, match="evaluation.batch_size must be int or None"):
    Config().set(["evaluation.batch_size=2.5"])
  assert Config().set(["optim.learning_rate=1"]).optim.learning_rate == 1.0
  assert Config().set(["optim.freeze=head"]).optim.freeze == ("head",)
  assert Config().set(["data.mean=pretrained"]).data.mean == "pretrained"


def test_set_type_check_follows_nested_dataclass_fields():
  import dataclasses
  from jcv.train.fieldtypes import check_field_value

  @dataclasses.dataclass
  class Optim:
    learning_rate: float = 0.1

  @dataclasses.dataclass
  class Cfg:
    optim: Optim = dataclasses.field(default_factory=Optim)

  assert check_field_value(Cfg, "optim.learning_rate", 2) == 2.0
  with pytest.raises(ValueError, match="optim.learning_rate must be float"):
    check_field_value(Cfg, "optim.learning_rate", "abc")


def test_predict_missing_file_is_one_line_exit_2(tmp_path):
  out = subprocess.run([sys.executable, "-m", "jcv", "predict", "--workdir", str(tmp_path), "nothere.jpg"],
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 2
  assert out.stderr.strip().startswith("error: image file(s) not found: nothere.jpg") and "Traceback" not in out.stderr


# ------------------------------------------------------------------ lock, resume check, cache


def test_lock_is_exclusive_names_the_holder_and_detects_a_stale_one(tmp_path):
  with rundir.WorkdirLock(tmp_path / "w") as lock:
    assert lock.stale is None
    with pytest.raises(rundir.WorkdirLockedError, match=f"pid {os.getpid()}"):
      rundir.WorkdirLock(tmp_path / "w").acquire()
  assert (tmp_path / "w" / ".lock").read_text() == ""  # released
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  (tmp_path / "w" / ".lock").write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "t"}))
  with rundir.WorkdirLock(tmp_path / "w") as lock:  # a dead holder's lock is taken over
    assert lock.stale["pid"] == dead.pid


def test_structural_differences_refuse_and_safe_changes_warn():
  base = {"config": {"model": {"name": "m"}, "optim": {"learning_rate": 0.1}, "evaluation": {"every": "1 epochs"},
                     "run": {"progress": True, "length": "10 steps"}},
          "class_names": ["a", "b"], "num_classes": 2, "total_steps": 10,
          "state": {"['params']['head']['kernel']": "float32[8, 2]"}}
  same = json.loads(json.dumps(base))
  assert rundir.structural_differences(base, same) == ([], [])
  other = json.loads(json.dumps(base))
  other.update(class_names=["a", "c"], total_steps=20, state={"['params']['head']['kernel']": "float32[8, 3]"},
               steps_per_epoch=5)
  base["steps_per_epoch"] = 4
  other["config"].update(model={"name": "n"}, optim={"learning_rate": 0.2}, evaluation={"every": "2 epochs"},
                         run={"progress": False, "length": "20 steps"})
  refuse, warn = rundir.structural_differences(base, other)
  text = " ".join(refuse)
  assert "schedule length 10 -> 20" in text and "classes" in text and "model.name 'm' -> 'n'" in text
  assert "float32[8, 2] -> float32[8, 3]" in text and "steps per epoch 4 -> 5" in text
  assert warn == ["evaluation.every '1 epochs' -> '2 epochs'", "optim.learning_rate 0.1 -> 0.2"]
  # Fields of nested sections are matched by their dotted path.
  nested = {**base, "config": {"optim": {"lookahead": {"every": 5}}}}
  refuse, _ = rundir.structural_differences(nested, {**base, "config": {"optim": {"lookahead": {"every": 3}}}})
  assert refuse == ["optim.lookahead.every 5 -> 3"]


def test_compilation_cache_is_in_the_users_cache_dir(tmp_path, monkeypatch):
  from jcv import perf
  monkeypatch.delenv("JCV_COMPILATION_CACHE", raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert perf.compilation_cache_dir() == str(tmp_path / "xdg" / "jcv" / "jax")
  shared = tmp_path / "shared"
  shared.mkdir()
  shared.chmod(0o777)
  with pytest.raises(PermissionError, match="writable by other users"):
    perf._private_dir(str(shared))


# ------------------------------------------------------------------ what a user sees


def test_progress_lines_when_not_on_a_terminal():
  from jcv.train.log import Progress
  out = io.StringIO()
  p = Progress(total=8, steps_per_epoch=4, stream=out, every_s=1e9)
  for step in range(1, 9):
    p.show(step, {"loss": 1.5, "top1": 0.25}, 100.0)
  p.eval(8, {"loss": 1.0, "top1": 0.5, "top5": 1.0, "n": 10})
  lines = out.getvalue().splitlines()
  assert len(lines) == 4  # first step, two epoch ends (the last is also the end), one eval
  assert lines[2].startswith("train step 8/8 (epoch 2/2)  loss 1.5000  acc 0.2500  100 img/s  ETA")
  assert lines[3].startswith("eval  step 8/8")


def test_curves_have_train_and_eval_on_one_axis_and_no_empty_panel(tmp_path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from jcv import plots
  history = [{"split": "train", "step": s, "loss": 2 / s, "top1": 0.1 * s, "lr": 0.1 / s} for s in range(1, 6)]
  history += [{"split": "eval", "step": 5, "epoch": 1.0, "loss": 1.0, "top1": 0.5}]
  seen = {}
  original = plt.Figure.savefig
  def spy(fig, *a, **k):
    seen["axes"] = [(ax.get_title(), ax.get_xlabel(), [ln.get_label() for ln in ax.get_lines()]) for ax in fig.axes]
    return original(fig, *a, **k)
  plt.Figure.savefig = spy
  try:
    plots.training_curves(history, tmp_path / "c.png")
    assert seen["axes"] == [("loss", "step", ["train", "eval"]), ("top-1 accuracy", "step", ["train", "eval"]),
                            ("learning rate", "step", ["_child0"])]
    plots.training_curves([r for r in history if r["split"] == "eval"], tmp_path / "e.png", x="epoch")
    assert [a[:2] for a in seen["axes"]] == [("loss", "epoch"), ("top-1 accuracy", "epoch")]
  finally:
    plt.Figure.savefig = original


# ------------------------------------------------------------------ run files, --restart (issue #29)


def test_symlinked_run_files_are_refused_and_their_targets_untouched(tmp_path):
  from jcv import safefile
  from jcv.train import log as log_lib
  victim = tmp_path / "thesis.tex"
  victim.write_text("precious\n")
  work = tmp_path / "w"
  work.mkdir()
  (work / ".lock").symlink_to(victim)
  with pytest.raises(safefile.UnsafeFileError, match=r"\.lock: it is a symbolic link"):
    rundir.WorkdirLock(work).acquire()
  (work / ".lock").unlink()
  (work / "metrics.jsonl").symlink_to(victim)
  with pytest.raises(safefile.UnsafeFileError, match=r"metrics\.jsonl: it is a symbolic link"):
    log_lib.MetricLogger(work)
  (work / "config.json").symlink_to(victim)
  with pytest.raises(safefile.UnsafeFileError, match=r"config\.json: it is a symbolic link"):
    log_lib.write_json(work / "config.json", {"a": 1})
  assert victim.read_text() == "precious\n"


def _tiny_run_cmd(workdir, *args):
  script = os.path.join(os.path.dirname(__file__), "train", "run_tiny.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))}
  return subprocess.run([sys.executable, script, "--workdir", str(workdir), *args], capture_output=True,
                        text=True, env=env, timeout=600)


def test_restart_refuses_a_folder_that_is_not_a_jcv_run_and_moves_nothing(tmp_path):
  thesis = tmp_path / "thesis"
  (thesis / "src").mkdir(parents=True)
  (thesis / "thesis.tex").write_text("\\chapter{}")
  out = _tiny_run_cmd(thesis, "--restart", "--steps", "2")
  assert out.returncode == 2, out.stderr[-2000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "is not a jcv run folder" in errors[0] and "Traceback" not in out.stderr
  assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]
  assert sorted(p.name for p in thesis.iterdir()) == ["src", "thesis.tex"]


def test_restart_moves_a_run_only_after_the_other_arguments_are_checked(tmp_path):
  from jcv import safefile
  from jcv.train import Data, fit
  run = tmp_path / "run"
  run.mkdir()
  safefile.mark_run_folder(run)
  (run / "config.json").write_text("{}")
  with pytest.raises(ValueError, match="does not exist"):
    fit(Config(data=Data(data_dir=str(tmp_path / "nonexistent"), image_size=8)), workdir=run, restart=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
  assert (run / "config.json").exists()


def test_a_workdir_inside_the_data_folder_is_no_class(tmp_path):
  from jcv import safefile
  root = _folder(tmp_path / "d")
  (root / "train" / "runs" / "checkpoints").mkdir(parents=True)
  safefile.mark_run_folder(root / "train" / "runs")
  src = sources.image_folder(root, split="train", cache=False)
  assert src.class_names == ["a", "b"] and len(src) == 6


def test_metrics_jsonl_after_a_resume_holds_no_rerun_steps_torn_lines_or_undecodable_text(tmp_path):
  from jcv.train import log as log_lib
  path = tmp_path / "metrics.jsonl"
  records = b"".join(json.dumps({"step": s, "split": "train", "loss": 1.0}).encode() + b"\n" for s in range(1, 9))
  path.write_bytes(records + b'{"step": 3, "spl\xff\xfe"}\n' + b'{"step": 9, "split": "tr')  # bad UTF-8, torn
  with pytest.warns(UserWarning, match=rf"{path}: skipped 1 line\(s\) that are not UTF-8"):
    logger = log_lib.MetricLogger(tmp_path, keep_until=5)  # resumed from step 5
  logger.scalars(6, {"loss": 0.5})
  logger.close()
  assert [(r["step"], r["loss"]) for r in log_lib.read_jsonl(path)] == [(s, 1.0) for s in range(1, 6)] + [(6, 0.5)]


def test_a_pth_with_a_pickle_payload_is_refused_in_one_line_naming_it(tmp_path):
  import pickle
  from jcv.weights import read_arrays
  path = tmp_path / "evil.pth"
  path.write_bytes(pickle.dumps({"w": (os.system, ("echo pwned",))}))
  with pytest.raises(ValueError) as info:
    read_arrays(path)
  assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_garbage_class_names_json_is_named(tmp_path):
  from jcv.train import evaluation
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "class_names.json").write_bytes(b"\x00garbage{")
  with pytest.raises(ValueError, match=r"class_names\.json \(the run's class names\) is damaged"):
    evaluation.load_run(tmp_path)


@pytest.mark.parametrize("argv,env", [(["-m", "jcv", "summary", "cifar_cnn", "--input-size", "-5"], {}),
                                      (["tests/train/run_tiny.py", "--workdir", "W", "--steps", "1"],
                                       {"JCV_NUM_PROCESSES": "abc"})])
def test_bad_numbers_in_flags_and_environment_are_one_line_exit_2(tmp_path, argv, env):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = [str(tmp_path / "w") if a == "W" else a for a in argv]
  out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=root, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": root, **env})
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error:"), out.stderr[-2000:]


def test_whitening_init_reads_mixed_sizes_and_skips_a_corrupt_file_like_the_loaders(tmp_path):
  from jcv.train import build, init_from
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate([(8, 8), (12, 10), (16, 16), (9, 14)]):
    cls = tmp_path / "d" / "train" / "ab"[i % 2]
    cls.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(cls / f"{i}.png")
  (tmp_path / "d" / "train" / "a" / "corrupt.png").write_bytes(b"\x89PNG not really")
  src = sources.image_folder(tmp_path / "d", split="train", cache=False)
  from jcv.train import Data, Init, Model, Whiten
  config = Config(model=Model(name="cifar_cnn"), data=Data(image_size=32), init=Init(whiten=Whiten(num_images=10)))
  with pytest.warns(UserWarning, match="whitening initialisation: skipped 1 corrupt image"):
    variables = init_from.initial_variables(config, build.build_model(config, 2), src)
  assert np.all(np.isfinite(variables["params"]["whiten"]["kernel"]))
