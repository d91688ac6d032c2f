"""Fixtures for the data tests: small image folders built from real shared files."""
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def cifar_root(shared_dir) -> pathlib.Path:
  return shared_dir / "data" / "cifar10"


@pytest.fixture()
def small_folder(tmp_path, cifar_root) -> pathlib.Path:
  """root/{train,test}/{airplane,cat}/ with 12 + 4 real CIFAR JPEGs per class (copied to tmp)."""
  root = tmp_path / "small"
  for split, n in (("train", 12), ("test", 4)):
    for cls in ("airplane", "cat"):
      dst = root / split / cls
      dst.mkdir(parents=True)
      for i in range(n):
        shutil.copy(cifar_root / split / cls / f"{i:04d}.jpg", dst / f"{i:04d}.jpg")
  return root


@pytest.fixture()
def odd_folder(tmp_path, shared_dir) -> pathlib.Path:
  """Flat root/<class>/ folder with a truncated JPEG, an RGBA PNG, a grayscale, a palette
  and a CMYK image next to good JPEGs (all written by the test from real photos)."""
  root = tmp_path / "odd"
  src = sorted((shared_dir / "data" / "cats_vs_dogs" / "train" / "cat").iterdir())[:6]
  (root / "cat").mkdir(parents=True)
  (root / "dog").mkdir(parents=True)
  for i, p in enumerate(src[:4]):
    shutil.copy(p, root / ("cat" if i % 2 else "dog") / f"good{i}.jpg")
  photo = Image.open(src[4]).convert("RGB").resize((48, 40))
  data = src[5].read_bytes()
  (root / "cat" / "truncated.jpg").write_bytes(data[: len(data) // 2])
  rgba = photo.convert("RGBA")
  rgba.putalpha(Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))))
  rgba.save(root / "cat" / "alpha.png")
  photo.convert("L").save(root / "dog" / "gray.png")
  photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(root / "dog" / "palette.png")
  photo.convert("CMYK").save(root / "cat" / "cmyk.jpg", quality=100)
  photo.save(root / "reference.png")  # not in a class folder: ignored by the source
  return root
