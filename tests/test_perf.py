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


_LIBC = ("libc = ctypes.CDLL('libc.so.6')\n"  # malloc and free callable from a -c script
         "libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]\n"
         "libc.free.argtypes = [ctypes.c_void_p]\n")


def _last_json(code, *args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc malloc tuning is Linux-only")
def test_tune_malloc_keeps_a_freed_block_above_2gb_mapped():
  """A 2.25 GB block freed and allocated again is not faulted in again (glibc kept it)."""
  code = (
      "import ctypes, json, resource, sys, jcv.perf as p\n"
      "tuned = p.tune_malloc() if sys.argv[1] == 'tune' else False\n"
      + _LIBC +
      "n = (9 << 30) // 4\n"
      "def touch():\n"
      "  a = libc.malloc(n); f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
      "  ctypes.memset(a, 1, n); f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f\n"
      "  libc.free(ctypes.c_void_p(a)); return f\n"
      "print(json.dumps({'tuned': tuned, 'faults': [touch(), touch()]}))\n")
  runs = {mode: _last_json(code, mode) for mode in ("tune", "plain")}
  pages = (9 << 30) // 4 // 4096
  assert runs["tune"]["tuned"]
  assert runs["plain"]["faults"][1] > pages // 2  # glibc's default: unmapped on free
  assert runs["tune"]["faults"][0] > pages // 2 and runs["tune"]["faults"][1] < pages // 100


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc malloc tuning is Linux-only")
def test_trim_heap_hands_back_what_tune_malloc_keeps():
  """After tune_malloc a freed 512 MB block stays resident; trim_heap gives it back."""
  code = (
      "import ctypes, json, jcv.perf as p\n"
      "p.tune_malloc()\n"
      + _LIBC +
      "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
      "a = libc.malloc(512 << 20); ctypes.memset(a, 1, 512 << 20); libc.free(ctypes.c_void_p(a))\n"
      "kept = rss(); trimmed = p.trim_heap()\n"
      "print(json.dumps({'kept': kept, 'after': rss(), 'trimmed': trimmed}))\n")
  got = _last_json(code)
  assert got["trimmed"] and got["kept"] - got["after"] > 400, got


def test_cli_start_tunes_malloc_before_the_backend_starts():
  code = (
      "import argparse, json\n"
      "from jcv import perf\n"
      "from jcv.train import cli\n"
      "seen = []\n"
      "perf.tune_malloc = lambda: seen.append(perf.backend_initialized()) or True\n"
      "cli.start(argparse.Namespace(coordinator_address=None, num_processes=None, process_id=None),"
      " host_devices=1)\n"
      "print(json.dumps({'backend_initialized_at_tune': seen}))\n")
  assert _run(code, {}) == {"backend_initialized_at_tune": [False]}


def test_cpu_only_reads_jax_platforms_without_starting_a_backend():
  code = ("import json, jcv.perf as p\n"
          "print(json.dumps({'cpu': p.cpu_only(), 'init': p.backend_initialized()}))\n")
  assert _run(code, {}) == {"cpu": True, "init": False}
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cuda,cpu", PYTHONPATH=str(ROOT))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, check=True)
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"cpu": False, "init": False}


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


@pytest.mark.parametrize("cache_mode,leaf_mode", [(0o777, None), (0o1777, None), (0o777, 0o700)],
                         ids=["world-writable", "sticky-1777", "inside-writable-parent"])
def test_compilation_cache_refuses_folders_other_users_can_write(tmp_path, cache_mode, leaf_mode):
  """Compiled programs load only from a folder no other user can change: neither a 0777 nor a
  sticky 1777 folder (others could plant entries), nor a private folder in a 0777 parent."""
  import jcv.perf
  folder = tmp_path / "shared"
  folder.mkdir()
  if leaf_mode is not None:
    folder = folder / "mine"
    folder.mkdir(mode=leaf_mode)
  os.chmod(tmp_path / "shared", cache_mode)
  with pytest.raises(PermissionError, match="writable by other users"):
    jcv.perf.enable_compilation_cache(folder)


def test_compilation_cache_accepts_a_private_folder_in_a_sticky_parent(tmp_path, monkeypatch):
  """A 0700 folder of the user's inside a root-owned sticky 1777 folder (as in /tmp) is private."""
  import jax
  import jcv.perf
  sticky = tmp_path / "tmp"
  sticky.mkdir()
  os.chmod(sticky, 0o1777)
  monkeypatch.setattr(jax.config, "update", lambda *a: None)  # leave this process's cache alone
  assert jcv.perf.enable_compilation_cache(sticky / "jax") == str(sticky / "jax")
  assert oct((sticky / "jax").stat().st_mode & 0o7777) == "0o700"


def test_cpu_has_bfloat16_reads_the_flags_line(tmp_path):
  from jcv import perf
  zen4 = tmp_path / "zen4"
  zen4.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 avx512_vnni\n\nprocessor\t: 1\n")
  skylake = tmp_path / "skylake"
  skylake.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512bw\nbugs\t\t: avx512_bf16_is_not_a_flag\n")
  sapphire = tmp_path / "sapphire"
  sapphire.write_text("flags\t\t: fpu avx512f amx_bf16 amx_tile\n")
  assert perf.cpu_has_bfloat16(str(zen4)) and perf.cpu_has_bfloat16(str(sapphire))
  assert not perf.cpu_has_bfloat16(str(skylake))
  assert not perf.cpu_has_bfloat16(str(tmp_path / "missing"))
  if pathlib.Path("/proc/cpuinfo").is_file():  # this machine, against grep's reading of the same file
    grep = subprocess.run(["grep", "-qwE", "avx512_bf16|amx_bf16", "/proc/cpuinfo"]).returncode == 0
    assert perf.cpu_has_bfloat16() == grep


def test_model_dtype_auto_follows_the_machine(monkeypatch):
  import jax.numpy as jnp
  from jcv import perf
  from jcv.train import Config, Model, build
  config = Config(model=Model(name="cifar_cnn", dtype="auto"))
  for fast, dtype in ((True, jnp.bfloat16), (False, None)):
    monkeypatch.setattr(perf, "bfloat16_is_fast", lambda: fast)
    assert build.compute_dtype(config) == ("bfloat16" if fast else "float32")
    assert build.model_options(config).get("dtype") == dtype
    assert build.build_model(config, 10).dtype == dtype
  assert build.compute_dtype(config.replace(model={"dtype": "float32"})) == "float32"
