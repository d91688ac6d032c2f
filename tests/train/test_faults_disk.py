"""Fault injection (issue #29): the disk fills during a run. One ``error:`` line (exit status 2)
naming the folder and the space a checkpoint needs; the previous checkpoint is kept; after space
is freed a re-run resumes and ends bitwise equal to an uninterrupted run.

A real full disk: a small tmpfs mounted in a private mount namespace (``unshare -m``), filled
from outside the run while it trains (skipped where mounting is not permitted). Simulated ones
(run_tiny.py's fault hooks): Orbax's background write of a checkpoint fails with ENOSPC, or an
append to metrics.jsonl does.
"""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import subprocs

STEPS = 24
# Every checkpoint is kept, so that no deletion frees space once the disk has been filled.
ARGS = ("--steps", STEPS, "--checkpoint-every", 3, "--set", "run.keep_checkpoints=100")
ROOM_KB = 32  # left free once step 6 is on disk: enough for the logs, less than a checkpoint (90+ KB)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run on a disk with room."""
  yield subprocs.run_to_end(tmp_path_factory.mktemp("ref") / "ref", *ARGS)
  subprocs.kill_leftovers()


def _assert_one_error_line(text: str, run) -> int:
  """The failed run's output is one ``error:`` line naming the folder and the space, and no
  traceback; returns the step it says is kept."""
  lines = text.splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and len(lines) < 20 and "Traceback" not in text, text[-5000:]
  line = errors[0]
  assert f"no space left on the device holding {run}" in line, line
  assert re.search(r"a checkpoint needs about \d+(\.\d)? (KB|MB|GB), \d+(\.\d)? (bytes|KB|MB|GB) are free", line), line
  return int(re.search(r"resume from step (\d+) \(kept\)", line).group(1))


def _assert_bitwise_equal(a_dir, b_dir):
  a, b = subprocs.load_params(a_dir), subprocs.load_params(b_dir)
  assert int(a.pop("step")) == int(b.pop("step")) == STEPS
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _tmpfs_permitted(mnt) -> bool:
  probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {mnt}"],
                         capture_output=True)
  return probe.returncode == 0


def _full_disk_script(tmp, mnt) -> str:
  """Shell commands run in a private mount namespace: a 4 MB tmpfs, a run on it that the
  script fills up to ``ROOM_KB`` once checkpoint 6 is on disk, a copy of what it left, then the
  filler deleted and the same command again."""
  run_tiny = f"{sys.executable} {subprocs.RUN_TINY} --workdir {mnt}/run " + " ".join(map(str, ARGS))
  return f"""
mount -t tmpfs -o size=4m tmpfs {mnt} || exit 97
{run_tiny} > {tmp}/full.log 2>&1 &
pid=$!
while [ ! -d {mnt}/run/checkpoints/6 ] && kill -0 $pid 2>/dev/null; do sleep 0.01; done
avail=$(df -k --output=avail {mnt} | tail -n 1)
head -c $(( (avail - {ROOM_KB}) * 1024 )) /dev/zero > {mnt}/filler
df -k {mnt} > {tmp}/df.txt
wait $pid; echo $? > {tmp}/full.rc
cp -a {mnt}/run {tmp}/left
rm {mnt}/filler
{run_tiny} > {tmp}/resume.log 2>&1; echo $? > {tmp}/resume.rc
mkdir -p {tmp}/resumed && cp {mnt}/run/params_p0.npz {tmp}/resumed/
"""


def test_a_full_tmpfs_is_one_error_line_and_a_rerun_resumes_bitwise(reference, tmp_path):
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  if not _tmpfs_permitted(mnt):
    pytest.skip("no permission to mount a tmpfs in a private mount namespace (unshare -m); "
                "test_a_simulated_full_disk_... covers the same path with a simulated ENOSPC")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(["unshare", "-m", "sh", "-c", _full_disk_script(tmp_path, mnt)], env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout + out.stderr
  full = (tmp_path / "full.log").read_text()
  assert (tmp_path / "full.rc").read_text().strip() == "2", full[-3000:] + (tmp_path / "df.txt").read_text()
  kept = _assert_one_error_line(full, mnt / "run")
  # The kept checkpoint is the newest complete one the full disk left, and a later step
  # (the one that did not fit) was never committed.
  left = subprocs.committed_steps(tmp_path / "left")
  assert kept >= 6 and left[-1] == kept and kept < STEPS, (left, full)
  resumed = (tmp_path / "resume.log").read_text()
  assert (tmp_path / "resume.rc").read_text().strip() == "0", resumed[-3000:]
  assert f"resuming from step {kept}" in resumed and "could not be restored" not in resumed, resumed[-3000:]
  _assert_bitwise_equal(reference, tmp_path / "resumed")


@pytest.mark.parametrize("fault, kept", [("JCV_TEST_DISK_FULL_FROM", 6), ("JCV_TEST_LOGS_FULL_FROM", 9)],
                         ids=["checkpoint", "metrics.jsonl"])
def test_a_simulated_full_disk_is_one_error_line_and_a_rerun_resumes_bitwise(reference, tmp_path, fault, kept):
  """A checkpoint from step 9 on, or the metrics.jsonl record of step 10, fails with ENOSPC."""
  run = tmp_path / "run"
  proc = subprocs.launch(run, *ARGS, env={fault: "9" if "DISK" in fault else "10"})
  assert subprocs.finish(proc) == 2, subprocs.output(proc)[-3000:]
  assert _assert_one_error_line(subprocs.output(proc), run) == kept
  assert subprocs.committed_steps(run)[-1] == kept
  proc = subprocs.launch(run, *ARGS)
  assert subprocs.finish(proc) == 0, subprocs.output(proc)[-3000:]
  assert f"resuming from step {kept}" in subprocs.output(proc)
  _assert_bitwise_equal(reference, run)
