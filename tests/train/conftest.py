"""Fixtures for the training tests: a temporarily registered tiny model, repo paths."""
import pathlib
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tiny  # noqa: E402


@pytest.fixture
def tiny_model():
  """Name of the test-only registered TinyCNN; unregistered after the test."""
  from jcv.models import registry
  name = tiny.register_tiny()
  yield name
  registry._REGISTRY.pop(name, None)
