"""The loop in-process: hundreds of steps on 8 devices, NaN stop, padded evaluation, checkpoints."""
import functools
import json
import math
import shutil

import jax
import numpy as np
import pytest

from jcv.train import Config, Evaluation, checkpoint, evaluation as evaluation_lib, fit, loop, optim, parallel, precise_bn
from jcv.train.state import create_train_state
from jcv.train.step import predict_logits
from run_tiny import BASE
from tiny import TinyCNN, array_sources, read_tensorboard


def test_few_hundred_steps_on_8_devices_do_not_hang(tmp_path):
  # Unbounded dispatch of sharded steps has deadlocked XLA's CPU collectives; the loop
  # blocks on metrics every max_steps_in_flight steps.
  assert jax.device_count() == 8
  train, _ = array_sources(64, 0)
  cfg = BASE.replace(data={"batch_size": 8, "eval_split": ""}, augment={"ops": ()},
                     run={"length": "300 steps", "log_every": "100 steps", "max_steps_in_flight": 16,
                          "checkpoint_every": None})
  results = fit(cfg, workdir=tmp_path, train_source=train, model=TinyCNN(use_bn=False))
  assert results["steps"] == 300
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [100, 200, 300]
  assert all(math.isfinite(r["loss"]) for r in records)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  train, evaluation = array_sources(64, 16)
  cfg = BASE.replace(optim={"learning_rate": 1e30, "momentum": 0.0, "weight_decay": 0.0},
                     schedule={"name": "constant"}, run={"length": "6 steps", "checkpoint_every": "1 steps"},
                     augment={"ops": ()})
  with pytest.raises(loop.NonFiniteLossError, match=r"at step (\d+)") as err:
    fit(cfg, workdir=tmp_path, train_source=train, eval_source=evaluation, model=TinyCNN())
  bad_step = int(err.value.args[0].split("at step ")[1].split(";")[0])
  ck = checkpoint.RunCheckpointer(tmp_path / "checkpoints")
  assert ck.all_steps() and max(ck.all_steps()) < bad_step  # only good states were saved
  tx, _ = optim.make_optimizer(cfg, steps_per_epoch=1, total_steps=1)
  state = create_train_state(jax.random.key(0), TinyCNN(), tx, (1, 8, 8, 3))
  restored = ck.restore(parallel.replicate(state, parallel.make_mesh()))[0]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))
  ck.close()


def test_evaluate_counts_every_example_once_with_padded_last_batch(tmp_path):
  train, evaluation = array_sources(64, 37)  # 37 = 2 batches of 16 + 5 real + 11 padding
  cfg = BASE.replace(run={"length": "4 steps", "plots": True}, evaluation={"batch_size": 16})
  fit(cfg, workdir=tmp_path, train_source=train, eval_source=evaluation)
  got = evaluation_lib.evaluate(tmp_path, source=evaluation, which="latest", batch_size=16)
  assert got["n"] == 37
  # Reference: the same checkpoint's logits over all 37 images in one unpadded batch, numpy metrics.
  config, _, state, _ = evaluation_lib.load_run(tmp_path, which="latest")
  images = np.stack([evaluation[i]["image"] for i in range(37)])
  labels = np.array([evaluation[i]["label"] for i in range(37)])
  logits = np.asarray(predict_logits(state, images, mean=config.data.mean, std=config.data.std), np.float64)
  logp = logits - logits.max(1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(1, keepdims=True))
  ranks = (logits > logits[np.arange(37), labels][:, None]).sum(1)
  assert got["top1"] == pytest.approx(np.mean(ranks < 1), abs=1e-6)
  assert got["top5"] == pytest.approx(np.mean(ranks < 5), abs=1e-6)
  assert got["loss"] == pytest.approx(-np.mean(logp[np.arange(37), labels]), rel=1e-5)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["final"]["eval"]["n"] == 37
  for name in ("curves.png", "confusion.png", "mistakes.png", "config.json", "class_names.json"):
    assert (tmp_path / name).stat().st_size > 0
  tb = read_tensorboard(tmp_path / "tensorboard")
  for tag in ("train/loss", "train/top1", "train/top5", "train/lr", "train/grad_norm", "train/img_per_s",
              "eval/loss", "eval/top1", "eval/top5"):
    assert tag in tb, sorted(tb)
  assert tb["eval/top1"][-1] == (4, pytest.approx(got["top1"], abs=1e-6))
  assert tb["train/augmented_batch"] == [(0, "image")]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in records} == {"train", "eval"}


@functools.lru_cache(maxsize=1)
def _small_state():
  tx, _ = optim.make_optimizer(Config(), steps_per_epoch=1, total_steps=1)
  return parallel.replicate(create_train_state(jax.random.key(0), TinyCNN(), tx, (1, 8, 8, 3)),
                            parallel.make_mesh())


def test_keeps_last_k_and_the_best(tmp_path):
  state = _small_state()
  ck = checkpoint.RunCheckpointer(tmp_path, keep=2, best_metric="top1")
  top1 = {1: 0.2, 2: 0.9, 3: None, 4: 0.5, 5: None, 6: 0.4}
  for step, value in top1.items():
    ck.save(state.replace(step=state.step + step), data_state={"next_batch": step},
            metrics=None if value is None else {"top1": value, "loss": 1.0})
  ck.wait()
  assert ck.all_steps() == [2, 5, 6]  # the best (2) and the last two
  assert ck.best_step() == 2 and ck.latest_step() == 6
  ck.close()
  low = checkpoint.RunCheckpointer(tmp_path / "by_loss", keep=1, best_metric="loss", best_mode="min")
  for step, loss in ((1, 0.3), (2, 0.1), (3, 0.2)):
    low.save(state.replace(step=state.step + step), metrics={"loss": loss, "top1": 0.0})
  low.wait()
  assert low.all_steps() == [2, 3] and low.best_step() == 2
  low.close()


def test_half_written_checkpoint_is_ignored_with_warning(tmp_path):
  state = _small_state()
  ck = checkpoint.RunCheckpointer(tmp_path, keep=3)
  ck.save(state.replace(step=state.step + 3), data_state={"next_batch": 3})
  ck.save(state.replace(step=state.step + 5), data_state={"next_batch": 5})
  ck.close()
  # What a SIGKILL during an Orbax save leaves: a temporary step folder with partial files.
  # And a damaged committed step (its array data lost) must fall back to the previous step.
  for f in (tmp_path / "5" / "state").rglob("*"):
    if f.is_file() and "metadata" not in f.name:
      f.write_bytes(b"")
  partial = tmp_path / "7.orbax-checkpoint-tmp-1234567"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "junk").write_bytes(b"\0" * 10)
  with pytest.warns(UserWarning, match="half-written checkpoint"):
    ck = checkpoint.RunCheckpointer(tmp_path, keep=3)
  assert ck.all_steps() == [3, 5]
  with pytest.warns(UserWarning, match="step 5 .* could not be restored"):
    restored, data_state, _, step = ck.restore(state)
  assert step == 3 and int(restored.step) == 3 and data_state == {"next_batch": 3}
  ck.close()


def _conv3x3_same(x, kernel):
  """NumPy 3x3 SAME convolution (NHWC, HWIO), float64."""
  n, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, w, kernel.shape[-1]))
  for i in range(3):
    for j in range(3):
      out += xp[:, i:i + h, j:j + w, :] @ kernel[i, j]
  return out


def test_recompute_batch_stats_averages_each_batch_statistics():
  # Precise BN: the plain average over batches of each batch's mean and (biased) variance,
  # against a NumPy transcription of TinyCNN's conv; frozen layers keep their statistics.
  from tiny import random_images
  mean, std = (0.3, 0.3, 0.3), (0.2, 0.2, 0.2)
  model = TinyCNN()  # BatchNorm momentum 0.9
  tx, _ = optim.make_optimizer(BASE, steps_per_epoch=1, total_steps=1)
  mesh = parallel.make_mesh()
  state = parallel.replicate(create_train_state(jax.random.key(0), model, tx, (1, 8, 8, 3)), mesh)
  images, labels = random_images(48)
  batches = [{"image": images[i:i + 16], "label": labels[i:i + 16]} for i in (0, 16, 32)]
  got = precise_bn.recompute_batch_stats(state, batches, mesh, mean=mean, std=std)
  kernel = np.asarray(state.params["Conv_0"]["kernel"], np.float64)
  feats = [_conv3x3_same((b["image"] / 255.0 - 0.3) / 0.2, kernel) for b in batches]
  want_mean = np.mean([f.mean(axis=(0, 1, 2)) for f in feats], axis=0)
  want_var = np.mean([f.var(axis=(0, 1, 2)) for f in feats], axis=0)
  bn = parallel.fetch(got.batch_stats)["BatchNorm_0"]
  np.testing.assert_allclose(bn["mean"], want_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bn["var"], want_var, rtol=1e-4)
  frozen = precise_bn.recompute_batch_stats(state, batches, mesh, mean=mean, std=std,
                                            freeze=("BatchNorm_0",))
  np.testing.assert_array_equal(parallel.fetch(frozen.batch_stats)["BatchNorm_0"]["var"], np.ones(8))


def test_fit_stores_the_recomputed_batch_stats(tmp_path):
  from jcv.data import pipeline
  train, _ = array_sources(64, 0)
  cfg = BASE.replace(run={"length": "4 steps"}, data={"eval_split": ""}, augment={"ops": ()},
                     evaluation={"bn_recompute": "40 examples"})
  results = fit(cfg, workdir=tmp_path, train_source=train)
  assert results["bn_recomputed_images"] == 40
  config, _, state, mesh = evaluation_lib.load_run(tmp_path, which="latest")
  # Recomputing from the checkpoint's weights on the same first 3 batches of 16 gives the
  # checkpoint's statistics back (the running averages of training would not).
  ld = pipeline.train_loader(train, batch_size=16, image_size=8, seed=0, crop=config.data.crop,
                             scale=tuple(config.data.crop_scale), flip=False)
  again = precise_bn.recompute_batch_stats(state, precise_bn.first_batches(ld, 40, 16), mesh,
                                           mean=config.data.mean, std=config.data.std)
  for a, b in zip(jax.tree.leaves(parallel.fetch(state.batch_stats)),
                  jax.tree.leaves(parallel.fetch(again.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="evaluation.bn_recompute"):
    Config(evaluation=Evaluation(bn_recompute="-1 examples")).validate()


def _fit_on(tmp_path, devices):
  train, _ = array_sources(64, 0)
  cfg = BASE.replace(run={"length": "6 steps", "devices": devices, "checkpoint_every": None},
                     data={"eval_split": "", "batch_size": 16}, augment={"ops": ()})
  results = fit(cfg, workdir=tmp_path / str(devices), train_source=train)  # advanced_cnn: BN, dropout
  _, _, state, _ = evaluation_lib.load_run(tmp_path / str(devices), which="latest")
  return results, parallel.fetch(state.params)


def test_run_devices_picks_the_mesh_and_auto_times_both(tmp_path, capsys):
  """run.devices=1 trains on one device of the 8, "auto" times all against one and says so;
  every choice gives the 8-device run's parameters (same global batch, float rounding)."""
  results, ref = _fit_on(tmp_path, "all")
  assert results["devices"]["trained_on"] == 8
  results, one = _fit_on(tmp_path, 1)
  assert results["devices"]["trained_on"] == 1
  results, auto = _fit_on(tmp_path, "auto")
  line = [l for l in capsys.readouterr().out.splitlines() if l.startswith("run.devices=auto")]
  assert len(line) == 1 and " on 8 devices, " in line[0] and " ms on one: training on " in line[0]
  assert results["devices"]["trained_on"] == int(line[0].rsplit(" ", 1)[1])
  for got in (one, auto):
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=0, atol=5e-6)


def test_run_devices_rejects_what_the_process_does_not_have(tmp_path):
  with pytest.raises(ValueError, match="run.devices"):
    Config().replace(run={"devices": "some"}).validate()
  with pytest.raises(ValueError, match=r"run.devices=9 needs 1 to 8 devices"):
    _fit_on(tmp_path, 9)


def test_a_reader_survives_steps_vanishing_while_orbax_lists_them(tmp_path, monkeypatch):
  # A live run's retention deleted every step a reader had listed, then deleted the next one
  # between Orbax's listing and its stat of that folder: the reader lists again and reads on.
  import etils.epath.backend as epath_backend
  state = _small_state()
  writer = checkpoint.RunCheckpointer(tmp_path, keep=2)
  for step in (3, 5):
    writer.save(state.replace(step=state.step + step), config={"step": step})
  writer.wait()
  reader = checkpoint.RunCheckpointer(tmp_path, read_only=True)
  for step in (7, 9):
    writer.save(state.replace(step=state.step + step), config={"step": step})
  writer.wait()
  assert writer.all_steps() == [7, 9] and reader.all_steps() == [3, 5]
  real_stat, vanished = epath_backend._OsPathBackend.stat, []
  def stat(self, path):
    if str(path).endswith("/7") and not vanished:
      vanished.append(path)
      shutil.rmtree(path)
    return real_stat(self, path)
  monkeypatch.setattr(epath_backend._OsPathBackend, "stat", stat)
  (tmp_path / "7" / "_CHECKPOINT_METADATA").unlink()  # the deletion has begun: Orbax stats the folder
  _, config, step = reader.read(lambda config: state, which="latest")
  assert vanished and step == 9 and config == {"step": 9}
  writer.close()
