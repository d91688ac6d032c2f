"""jcv.perf: checked in fresh subprocesses (XLA flags are read once per process)."""
import json
import os
import pathlib
import platform
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str, env_update: dict) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(env_update, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_setup_cpu_sets_host_devices_and_keeps_user_flags():
  code = (
      "import json, jcv.perf as p\n"
      "done = p.setup_cpu(host_devices=3)\n"
      "import jax\n"
      "print(json.dumps({'n': jax.device_count(), 'flags': done['xla_flags'], "
      "'malloc': done['malloc'], 'init': p.backend_initialized()}))\n")
  got = _run(code, {})
  assert got["n"] == 3 and got["init"]
  assert "--xla_force_host_platform_device_count=3" in got["flags"]
  assert got["malloc"] == (platform.system() == "Linux")
  # A device count the user already chose wins.
  got = _run(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
  assert got["n"] == 2


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 2), (6, 4), (16, 16)])
def test_setup_cpu_cores_rounds_down_to_a_power_of_two(cores, expected):
  code = (
      "import json, os, jcv.perf as p\n"
      f"os.cpu_count = lambda: {cores}\n"
      "p.setup_cpu(host_devices='cores', malloc=False)\n"
      "import jax\n"
      "print(json.dumps({'n': jax.device_count()}))\n")
  assert _run(code, {})["n"] == expected


@pytest.mark.parametrize("cores,per_core,expected", [(2, 2, 4), (6, 2, 8), (1, 3, 3)])
def test_setup_cpu_devices_per_core_multiplies_the_core_count(cores, per_core, expected):
  code = (
      "import json, os, jcv.perf as p\n"
      f"os.cpu_count = lambda: {cores}\n"
      f"p.setup_cpu(host_devices='cores', malloc=False, devices_per_core={per_core})\n"
      "import jax\n"
      "print(json.dumps({'n': jax.device_count()}))\n")
  assert _run(code, {})["n"] == expected


def test_setup_cpu_rejects_bad_device_count():
  import jcv.perf
  with pytest.raises(ValueError, match="host_devices"):
    jcv.perf.setup_cpu(host_devices=-1, malloc=False)
  with pytest.raises(ValueError, match="devices_per_core"):
    jcv.perf.setup_cpu(host_devices="cores", malloc=False, devices_per_core=0)


def test_compilation_cache_writes_entries(tmp_path):
  code = (
      "import json, jcv.perf as p, jax, jax.numpy as jnp\n"
      f"d = p.enable_compilation_cache({str(tmp_path)!r}, min_compile_time_s=0)\n"
      "jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).block_until_ready()\n"
      "import os; print(json.dumps({'dir': d, 'files': len(os.listdir(d))}))\n")
  got = _run(code, {})
  assert got["dir"] == str(tmp_path) and got["files"] >= 1
