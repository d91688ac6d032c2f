"""benchmarks/: throughput.py end to end as a real subprocess (tiny: one model, batch 4), and the timing loop."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_throughput_script_writes_every_output_and_uses_host_devices(tmp_path):
  out = tmp_path / "tp"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu")
  cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--models", "cifar_cnn:32",
         "--batch-sizes", "4", "--rounds", "1", "--iters", "1", "--warmup", "0", "--budget", "5",
         "--host-devices", "2", "--baseline", "--no-isolate", "--compare", "no_such_peer",
         "--out", str(out)]
  bad = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "--compare" in bad.stderr  # an unknown peer is a usage error
  cmd = cmd[:-4] + ["--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.with_suffix(".json").read_text())
  assert report["machine"]["jcv_devices"] == 2
  rows = {(r["framework"], r["mode"]): r for r in report["rows"]}
  assert set(rows) == {(fw, m) for fw in ("jcv", "flax_xla") for m in ("train", "infer")}
  for r in rows.values():
    assert r["img_per_s"] > 0 and r["batch"] == 4 and r["gflop_per_img"] > 0
  # --train-devices auto (the default): the train step on the faster of 2 devices and one, said
  # in the output; inference on both
  assert rows[("jcv", "infer")]["xla_devices"] == 2
  picked = [l for l in proc.stdout.splitlines() if "run.devices=auto" in l]
  assert len(picked) == 1 and rows[("jcv", "train")]["xla_devices"] == int(picked[0].rsplit(" ", 1)[1])
  for suffix in (".csv", ".md", ".png"):
    assert out.with_suffix(suffix).stat().st_size > 0


def test_throughput_runs_each_framework_in_its_own_process(tmp_path):
  """The default: jcv (and its variants) on 2 XLA devices in a worker each, a failing peer reported,
  no worker left."""
  out = tmp_path / "iso"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", KERAS_BACKEND="no_such_backend")
  cmd = [sys.executable, str(ROOT / "benchmarks" / "throughput.py"), "--models", "cifar_cnn:32",
         "--batch-sizes", "4", "--rounds", "2", "--iters", "1", "--warmup", "0", "--budget", "5",
         "--host-devices", "2", "--train-devices", "all", "--compare", "jcv_cpu,jcv_unfolded,jcv_xla_onednn,keras",
         "--out", str(out)]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  assert "jcv in its own process" in stdout
  report = json.loads(out.with_suffix(".json").read_text())
  assert report["machine"]["isolated"] and report["machine"]["jcv_devices"] == 2
  rows = {(r["framework"], r["mode"]): r for r in report["rows"]}
  jcvs = ("jcv", "jcv_cpu", "jcv_unfolded", "jcv_xla_onednn")  # the last with XLA's oneDNN flags, accepted
  assert set(rows) == {(fw, m) for fw in jcvs for m in ("train", "infer")}
  for r in rows.values():  # timed by the workers themselves: CPU time is theirs, not the parent's
    assert r["xla_devices"] == 2 and r["img_per_s"] > 0 and r["cpu_ms_per_step"] > 1
  assert any("keras" in k for k in report["problems"])
  assert "jcv (2 dev)" in out.with_suffix(".md").read_text()
  workers = subprocess.run(["pgrep", "-f", "benchmarks/throughput.py --worker"],
                           capture_output=True, text=True).stdout.split()
  assert not workers  # each worker exits when its config is done


def test_optimizers_benchmark_times_both_presets(tmp_path):
  out = tmp_path / "opt"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu")
  cmd = [sys.executable, str(ROOT / "benchmarks" / "optimizers.py"), "--batch-size", "8", "--rounds", "1",
         "--steps-per-call", "1", "--host-devices", "2", "--out", str(out)]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.with_suffix(".json").read_text())
  assert report["devices"] == 2 and report["batch_size"] == 8
  assert [r["optimizer"] for r in report["rows"]] == ["sgd_lookahead (cpu_sgd)", "muon (cpu)"]
  assert all(r["img_per_s"] > 0 for r in report["rows"]) and report["rows"][0]["vs_sgd"] == 1.0
  # The cpu preset's net (width 0.75): its last conv is 192 x (3*3*192) for Newton-Schulz.
  assert report["kernel_matrices"][-1] == [192, 1728] and report["newton_schulz_ms"] > 0


def test_warm_up_continues_until_calls_stop_getting_faster(monkeypatch):
  """A callable whose first calls are slow (like a jitted step growing its heap) is warmed up
  past them: none of the slow calls is among the timed iterations, however small ``warmup``."""
  import time
  monkeypatch.syspath_prepend(str(ROOT))
  from benchmarks.common import interleaved_times
  delays = iter([0.08, 0.05, 0.03])  # then 0.005 s for every later call

  def step():
    time.sleep(next(delays, 0.005))

  times = interleaved_times({"step": step}, rounds=2, iters_per_round=2, warmup=1)["step"]
  assert len(times) == 4 and max(times) < 0.02, times
