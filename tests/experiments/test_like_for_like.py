"""experiments/cats_vs_dogs.py --variant like_for_like: scratch, frozen and finetune of each backbone
differ only in their initial weights and what trains, and the comparison runs end to end as a real
subprocess on a few real JPEGs, leaving its table and figure."""
import json
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "experiments" / "cats_vs_dogs.py"


def _run(args, env, timeout=300):
  return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_the_three_regimes_differ_only_in_init(script_env, tmp_path):
  proc = _run(["--variant", "like_for_like", "--workdir", tmp_path, "--print-config"], script_env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  configs = [json.loads(block) for block in re.split(r"\n(?=\{)", proc.stdout.strip())]
  assert [(c["model"]["name"], c["init"]["trainable"]) for c in configs] == [
      (b, t) for b in ("mobilenet_v2", "efficientnet_lite2") for t in ("all", "head", "backbone")]
  for group in (configs[:3], configs[3:]):
    assert len({json.dumps({k: v for k, v in c.items() if k != "init"}, sort_keys=True) for c in group}) == 1
    assert group[0]["init"]["pretrained"] is None and group[1]["init"]["pretrained"] == group[2]["init"]["pretrained"]
    assert group[0]["data"]["image_size"] == 160 and group[0]["run"]["length"] == "6 epochs"
  assert configs[3]["init"]["pretrained"] is None and configs[4]["init"]["pretrained"]["weights"].endswith(
      "efficientnet_lite2.npz")


def test_smoke_run_writes_the_table_and_curves(tiny_folder, script_env, tmp_path):
  data = tiny_folder("cats_vs_dogs", {"train": 11, "test": 4})
  workdir = tmp_path / "cats"
  proc = _run(["--variant", "like_for_like", "--backbone", "mobilenet_v2", "--data-dir", data, "--workdir", workdir,
               "--steps", "2", "--batch-size", "8", "--image-size", "32", "--minutes-per-run", "0",
               "--set", "run.plots=False"], script_env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  folder = workdir / "mobilenet_v2" / "same_epochs"
  rows = json.loads((folder / "comparison.json").read_text())
  assert [(r["run"], r["steps"], r["image_size"], r["status"]) for r in rows] == [
      (regime, 2, 32, "ok") for regime in ("scratch", "frozen", "finetune")]
  assert all(r["test_n"] == 8 and 0 <= r["test_top1"] <= 1 for r in rows)
  assert (folder / "comparison.png").stat().st_size > 0 and "| frozen | 32 | 2 |" in (folder / "comparison.md").read_text()
  assert not (workdir / "mobilenet_v2" / "same_time").exists()  # --minutes-per-run 0: no same-time table
