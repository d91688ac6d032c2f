"""Helpers of the experiment-script tests: a few real images copied from ../shared, and the
environment a script runs in as a user runs it."""
import os
import pathlib
import shutil

import pytest

from script_cache import private_cache

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_folder(shared_dir, tmp_path):
  """``make(dataset, per_split)``: the first N real files per class of each split of
  ``../shared/data/<dataset>``, copied to ``tmp_path/<dataset>`` (root/<split>/<class>/<file>)."""
  def make(dataset: str, per_split: dict) -> pathlib.Path:
    src, dst = shared_dir / "data" / dataset, tmp_path / dataset
    for split, count in per_split.items():
      for folder in sorted(p for p in (src / split).iterdir() if p.is_dir()):
        (dst / split / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:count]:
          shutil.copy(f, dst / split / folder.name / f.name)
    return dst
  return make


@pytest.fixture
def script_env(tmp_path):
  """The environment of a script run: this checkout on PYTHONPATH, a private cache, one CPU device per core."""
  env = dict(os.environ, JCV_CACHE_DIR=private_cache(tmp_path), PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)  # as a user runs it
  return env
