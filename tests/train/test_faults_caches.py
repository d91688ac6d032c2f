"""Fault injection (issue #29): damaged caches heal, unwritable caches are skipped, temporary
files of killed runs are cleaned. Data caches of real image folders, feature caches of a tiny
staged model, a read-only bind mount in a private mount namespace (or a 0555 folder)."""
import os
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
from PIL import Image

from jcv.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _folder(root, *, per_class=3, size=8):
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    (root / "train" / cls).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / "train" / cls / f"{i}.png")
  return root


def _load(root, cache):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    src = sources.image_folder(root, split="train", cache=True, cache_dir=cache)
  return src, [str(w.message) for w in caught]


@pytest.mark.parametrize("damage", ["truncated_images", "empty_json", "garbage_json"])
def test_a_damaged_data_cache_is_rebuilt_with_one_warning_naming_it(tmp_path, damage):
  root, cache = _folder(tmp_path / "d"), tmp_path / "cache"
  first, _ = _load(root, cache)
  images = next(cache.glob("*.images.npy"))
  meta = next(cache.glob("*.json"))
  if damage == "truncated_images":
    images.write_bytes(images.read_bytes()[:100])
  else:
    meta.write_text("" if damage == "empty_json" else "{]garbage")
  again, messages = _load(root, cache)
  assert len(messages) == 1 and "is damaged" in messages[0] and "rebuilding" in messages[0], messages
  assert str(cache) in messages[0]
  np.testing.assert_array_equal(again.images, first.images)
  third, messages = _load(root, cache)  # the rebuilt cache loads without a word
  assert messages == [] and len(third) == 6


def test_stale_temporary_cache_files_of_killed_runs_are_removed(tmp_path):
  root, cache = _folder(tmp_path / "d"), tmp_path / "cache"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  cache.mkdir()
  stale = [cache / f"d-0123.{dead.pid}.tmp.images.npy", cache / f".d-0123.images.npy.{dead.pid}.tmp.npy"]
  live = cache / f".d-0123.images.npy.{os.getpid()}.tmp.npy"  # a run still writing
  for p in stale + [live]:
    p.write_bytes(b"x" * 100)
  _load(root, cache)
  assert not any(p.exists() for p in stale) and live.exists()


def _tiny_staged():
  from test_transfer import SIZE, TinyStaged
  model = TinyStaged()
  variables = jax.jit(model.init)(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3), np.float32))
  return model, variables, SIZE


def test_a_truncated_feature_cache_is_rebuilt_with_one_warning_naming_it(tmp_path):
  from jcv.train import features
  model, variables, size = _tiny_staged()
  source = sources.ArraySource(np.random.default_rng(1).integers(0, 256, (6, size, size, 3), dtype=np.uint8),
                               np.arange(6) % 3)
  run = lambda: features.cache_features(model, variables, {"train": source}, stage=2, image_size=size,
                                        batch_size=4, directory=tmp_path, log=None)["train"][0]
  first = run()
  (path,) = tmp_path.glob("*.npz")
  path.write_bytes(path.read_bytes()[:200])
  with pytest.warns(UserWarning, match=rf"feature cache {path} .*is damaged.*rebuilding") as caught:
    again = run()
  assert len(caught) == 1
  np.testing.assert_allclose(again, first, rtol=1e-6)
  with np.load(path) as data:
    assert data["features"].shape == first.shape


def _read_only_folder(tmp_path):
  """(folder, shell prefix): a read-only bind mount in a private mount namespace when that is
  permitted, else a 0555 folder (which does not stop root: then the test is skipped)."""
  ro = tmp_path / "ro"
  (ro / "home").mkdir(parents=True)
  (ro / "cache").mkdir()
  probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro}"],
                         capture_output=True)
  if probe.returncode == 0:
    return ro, f"mount --bind {ro} {ro} && mount -o remount,ro,bind {ro} && "
  if os.getuid() == 0:
    pytest.skip("running as root without permission to mount: a 0555 folder would not stop root")
  for p in (ro / "home", ro / "cache", ro):
    p.chmod(0o555)
  return ro, ""


def test_unwritable_home_and_caches_are_a_warning_and_the_run_goes_on(tmp_path):
  ro, prefix = _read_only_folder(tmp_path)
  root = _folder(tmp_path / "d")
  script = (f"from jcv.data import sources; s = sources.image_folder({str(root)!r}, split='train', cache=True); "
            "print('decoded', len(s))")
  run_tiny = os.path.join(REPO, "tests", "train", "run_tiny.py")
  command = (f"{prefix}{sys.executable} -c \"{script}\" && {sys.executable} {run_tiny} --workdir {tmp_path / 'w'} "
             "--steps 2 --set run.compilation_cache=auto")
  env = {**os.environ, "HOME": str(ro / "home"), "JCV_CACHE_DIR": str(ro / "cache"), "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": REPO}
  env.pop("XDG_CACHE_HOME", None)
  env.pop("JCV_COMPILATION_CACHE", None)
  out = subprocess.run(["unshare", "-m", "sh", "-c", command] if prefix else ["sh", "-c", command],
                       capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "decoded 6" in out.stdout and "Traceback" not in out.stderr
  warned = [line for line in out.stderr.splitlines() if "cannot" in line and "cache" in line]
  assert any("decoded-image cache" in w for w in warned) and any("compilation cache" in w for w in warned), out.stderr
  assert not any(os.scandir(ro / "cache"))
