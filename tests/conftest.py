"""Test setup: 8 fake CPU devices so data-parallel code is exercised on any machine."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

SHARED = pathlib.Path(os.environ.get("JCV_SHARED", pathlib.Path(__file__).resolve().parents[1].parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """The ../shared folder (real images and pretrained weights); override with $JCV_SHARED."""
  if not (SHARED / "data").is_dir():
    pytest.fail(f"real test data not found at {SHARED}; set JCV_SHARED to the shared/ folder")
  return SHARED
