"""Training tests import their helpers (tiny.py, subprocs.py) from this folder."""
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import subprocs  # noqa: E402


@pytest.fixture(autouse=True)
def _stop_leftover_runs():
  """A failed subprocess test must not leave its training runs behind."""
  yield
  subprocs.kill_leftovers()
