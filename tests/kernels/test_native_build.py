"""Building and loading jcv's native library: code is loaded only from folders no other user
can write, and an interrupted or killed build leaves no temporary library behind.

Real processes throughout: the build runs in a subprocess with the real compiler, or with a
fake ``$CXX`` script that waits (to interrupt it mid-build) or fails. The tests run as root,
which owns every file it creates, so "another user's folder" is simulated by mode bits.
"""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from jcv.kernels import native

ROOT = pathlib.Path(__file__).resolve().parents[2]
PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
  const char *mark = getenv("JCV_PLANT_MARK");
  FILE *f = mark ? fopen(mark, "w") : NULL;
  if (f) { fputs("planted code ran\n", f); fclose(f); }
}
"""
LOAD = "from jcv.kernels import native; print('AVAILABLE', native.available(), native.unavailable_reason())"


def _env(**extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             XLA_FLAGS="--xla_force_host_platform_device_count=1", PYTHONWARNINGS="always")
  env.update({k: str(v) for k, v in extra.items()})
  return env


@pytest.mark.skipif(not native.available() or not shutil.which("gcc"),
                    reason=f"needs the native library and gcc ({native.unavailable_reason()})")
@pytest.mark.parametrize("cache_mode,native_mode", [(0o777, 0o777), (0o1777, 0o777), (0o777, 0o755)],
                         ids=["world-writable", "sticky-1777", "writable-parent"])
def test_planted_library_in_a_shared_cache_never_runs(tmp_path, cache_mode, native_mode):
  """A library planted under the expected name in a cache others can write is never loaded:
  jcv builds its own in a private folder and says so in one warning."""
  cache, mark = tmp_path / "cache", tmp_path / "planted-ran"
  (cache / "native").mkdir(parents=True)
  (tmp_path / "planted.c").write_text(PLANTED)
  planted = cache / "native" / os.path.basename(native.library_path())
  subprocess.run(["gcc", "-shared", "-fPIC", str(tmp_path / "planted.c"), "-o", str(planted)], check=True)
  os.chmod(cache / "native", native_mode)
  os.chmod(cache, cache_mode)
  proc = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=600,
                        env=_env(JCV_CACHE_DIR=cache, JCV_PLANT_MARK=mark))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert not mark.exists(), "the planted library's constructor ran"
  assert "AVAILABLE True None" in proc.stdout  # built and loaded from a private folder
  warned = [line for line in proc.stderr.splitlines() if "not loading native code from" in line]
  assert len(warned) == 1 and "writable by other users" in warned[0], proc.stderr[-2000:]
  assert sorted(p.name for p in (cache / "native").iterdir()) == [planted.name]  # nothing written there


def _waiting_compiler(tmp_path):
  script = tmp_path / "slow-cxx"
  script.write_text(f"#!/bin/sh\ntouch {tmp_path / 'started'}\nexec sleep 120\n")
  script.chmod(0o755)
  return script


def _default_sigint():
  """A shell's background job ignores SIGINT, and its children inherit that: restore the default
  so that Python turns the signal into KeyboardInterrupt however pytest was started."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_build(tmp_path, cache):
  proc = subprocess.Popen([sys.executable, "-c", LOAD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True, preexec_fn=_default_sigint,
                          env=_env(CXX=_waiting_compiler(tmp_path), JCV_CACHE_DIR=cache))
  deadline = time.monotonic() + 120
  while not (tmp_path / "started").exists():
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
    time.sleep(0.1)
  return proc


def _libraries(cache):
  return sorted(p.name for p in (cache / "native").iterdir() if p.name.endswith(".so"))


def test_ctrl_c_during_the_build_leaves_no_temporary_library(tmp_path):
  cache = tmp_path / "cache"
  proc = _start_build(tmp_path, cache)
  assert _libraries(cache)  # the build's temporary output exists while the compiler runs
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
  assert _libraries(cache) == []


def test_a_killed_build_leaves_a_temporary_that_the_next_build_removes(tmp_path):
  cache = tmp_path / "cache"
  proc = _start_build(tmp_path, cache)
  os.killpg(proc.pid, signal.SIGKILL)  # the interpreter and its compiler
  proc.communicate(timeout=60)
  stale = _libraries(cache)
  assert len(stale) == 1
  failing = tmp_path / "failing-cxx"
  failing.write_text("#!/bin/sh\necho 'error: fake compiler' >&2\nexit 1\n")
  failing.chmod(0o755)
  again = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, timeout=300,
                         env=_env(CXX=failing, JCV_CACHE_DIR=cache))
  assert "AVAILABLE False compiling" in again.stdout, again.stdout + again.stderr[-2000:]
  assert _libraries(cache) == []


def test_unsafe_cache_and_no_private_folder_falls_back_to_xla(tmp_path):
  """With neither the cache nor the temporary folder private, nothing is built or loaded."""
  shared = tmp_path / "shared"
  shared.mkdir()
  shared.chmod(0o777)
  code = textwrap.dedent(f"""
      {LOAD}
      import jax.numpy as jnp
      from jcv import kernels
      print(kernels.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), lowering="onednn").sum())
  """)
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                        env=_env(JCV_CACHE_DIR=shared, TMPDIR=shared))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "AVAILABLE False no private folder" in proc.stdout, proc.stdout
  assert float(proc.stdout.split()[-1]) == 400.0  # 3x3 SAME conv of ones, 2 -> 2 channels, on XLA
  assert not any(p.name.endswith(".so") for p in shared.rglob("*"))
