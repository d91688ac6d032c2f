"""Multi-host for real: two processes on 127.0.0.1 (gloo CPU collectives, 2 devices each)
train a few steps; both hold identical parameters, equal to one process with 4 devices."""
import socket

import numpy as np

import subprocs

ARGS = ("--steps", 6, "--batch-size", 16, "--set", "evaluation.batch_size=8")
# Same global batches and math; only the cross-process reduction order of float32 sums differs.
ATOL = 2e-6


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_each_other_and_one_process(tmp_path):
  port = _free_port()
  hosts = [subprocs.launch(tmp_path / "multi", *ARGS, "--coordinator-address", f"127.0.0.1:{port}",
                           "--num-processes", 2, "--process-id", i, devices=2) for i in range(2)]
  single = subprocs.launch(tmp_path / "single", *ARGS, devices=4)
  for p in hosts + [single]:
    assert subprocs.finish(p) == 0, subprocs.output(p)[-3000:]
  p0, p1 = subprocs.load_params(tmp_path / "multi", 0), subprocs.load_params(tmp_path / "multi", 1)
  ref = subprocs.load_params(tmp_path / "single")
  assert int(p0["step"]) == int(p1["step"]) == int(ref["step"]) == 6
  assert p0.keys() == ref.keys()
  for k in p0:
    np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    np.testing.assert_allclose(p0[k], ref[k], atol=ATOL, rtol=0, err_msg=k)
  assert "processes\": 2" in (tmp_path / "multi" / "results.json").read_text()
