"""Fixtures for the jcv.ops tests: crops of scikit-image's bundled photos and random images."""
import numpy as np
import pytest
from skimage import data


def _crop(image, size=(72, 96)):
  h, w = image.shape[:2]
  top, left = (h - size[0]) // 2, (w - size[1]) // 2
  return np.ascontiguousarray(image[top:top + size[0], left:left + size[1]])


@pytest.fixture(scope="session")
def photos_u8():
  """Three real RGB photos (astronaut, coffee, chelsea), 72x96 uint8 central crops."""
  return {name: _crop(getattr(data, name)()) for name in ("astronaut", "coffee", "chelsea")}


@pytest.fixture(scope="session")
def photo_u8(photos_u8):
  """The astronaut crop, uint8 [72, 96, 3]."""
  return photos_u8["astronaut"]


@pytest.fixture(scope="session")
def photo(photo_u8):
  """The astronaut crop as float32 in [0, 1]."""
  return photo_u8.astype(np.float32) / 255.0


@pytest.fixture(scope="session")
def batch(photos_u8):
  """The three photos stacked as float32 [3, 72, 96, 3]."""
  return np.stack(list(photos_u8.values())).astype(np.float32) / 255.0


@pytest.fixture(scope="session")
def random_image():
  """A random float32 RGB image [72, 96, 3] in [0, 1] (uniform noise, seed 0)."""
  return np.random.default_rng(0).random((72, 96, 3), dtype=np.float32)


@pytest.fixture(scope="session")
def images(batch, random_image):
  """The three photos plus the noise image, float32 [4, 72, 96, 3]."""
  return np.concatenate([batch, random_image[None]])
