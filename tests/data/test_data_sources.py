"""Sources: the real image folders in ../shared/data, odd file formats, the .npy cache, tfds mocks."""
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from jcv.data import decode, sources

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------ real folders in ../shared/data


@pytest.mark.parametrize("name,split,count,classes", [
  ("cifar10", "test", 10_000, CIFAR_CLASSES),
  ("cats_vs_dogs", "train", 2_000, ["cat", "dog"]),
  ("cats_vs_dogs", "test", 1_000, ["cat", "dog"]),
  ("food101_mini", "train", 750, None),
  ("food101_mini", "test", 1_000, None),
])
def test_shared_folders_counts_and_classes(shared_dir, name, split, count, classes):
  src = sources.image_folder(shared_dir / "data" / name, split=split, cache=False)
  assert len(src) == count  # the totals in ../shared/data/README.md
  if classes is not None:
    assert src.class_names == classes
  assert len(src.class_names) == {"cifar10": 10, "cats_vs_dogs": 2, "food101_mini": 10}[name]
  assert np.bincount(src.labels).tolist() == [count // len(src.class_names)] * len(src.class_names)
  rec = src[len(src) // 2]
  assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3 and rec["image"].shape[-1] == 3
  # Same pixels as OpenCV's decoder (both libjpeg; allow tiny IDCT differences).
  ref = cv2.cvtColor(cv2.imread(src.paths[len(src) // 2], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
  assert rec["image"].shape == ref.shape
  assert np.abs(rec["image"].astype(int) - ref).max() <= 3
  assert rec["label"] == src.labels[len(src) // 2]


def test_carved_validation_split_is_stratified_disjoint_and_seeded(shared_dir):
  root = shared_dir / "data" / "cats_vs_dogs"
  train = sources.image_folder(root, split="train", val_fraction=0.1, seed=3, cache=False)
  val = sources.image_folder(root, split="val", val_fraction=0.1, seed=3, cache=False)
  full = sources.image_folder(root, split="train", cache=False)
  assert len(val) == 200 and len(train) == 1800
  assert np.bincount(val.labels).tolist() == [100, 100]
  assert not set(train.paths) & set(val.paths)
  assert sorted(train.paths + val.paths) == sorted(full.paths)
  again = sources.image_folder(root, split="val", val_fraction=0.1, seed=3, cache=False)
  other = sources.image_folder(root, split="val", val_fraction=0.1, seed=4, cache=False)
  assert again.paths == val.paths and other.paths != val.paths


def test_split_slicing_matches_python_slices(small_folder):
  full = sources.image_folder(small_folder, split="train", cache=False)
  assert len(full) == 24
  for spec, sl in [("train[:50%]", slice(0, 12)), ("train[25%:]", slice(6, None)), ("train[3:-2]", slice(3, -2))]:
    part = sources.image_folder(small_folder, split=spec, cache=False)
    assert part.paths == full.paths[sl], spec


def test_flat_layout_and_bad_arguments(small_folder, tmp_path):
  flat = small_folder / "train"  # root/<class>/<file>
  everything = sources.image_folder(flat, cache=False)
  assert len(everything) == 24 and everything.class_names == ["airplane", "cat"]
  tr = sources.image_folder(flat, split="train", val_fraction=0.25, cache=False)
  va = sources.image_folder(flat, split="val", val_fraction=0.25, cache=False)
  assert (len(tr), len(va)) == (18, 6)
  with pytest.raises(ValueError, match="val_fraction"):
    sources.image_folder(flat, split="val", cache=False)
  with pytest.raises(ValueError, match="does not exist"):
    sources.image_folder(tmp_path / "nope")
  with pytest.raises(ValueError, match="split"):
    sources.image_folder(small_folder, split="train[::2]")
  with pytest.raises(ValueError, match="val_fraction must be in"):
    sources.image_folder(small_folder, split="train", val_fraction=1.5)


# ------------------------------------------------------------------ odd files


def test_odd_modes_decode_to_rgb_like_opencv(odd_folder):
  ref = np.asarray(Image.open(odd_folder / "reference.png"))
  for name in ("cat/alpha.png", "dog/gray.png", "dog/palette.png"):
    got = decode.decode_image(odd_folder / name)
    assert got.shape == (40, 48, 3) and got.dtype == np.uint8
    cv = cv2.cvtColor(cv2.imread(str(odd_folder / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(got, cv, err_msg=name)  # OpenCV drops alpha / expands grey the same way
  np.testing.assert_array_equal(decode.decode_image(odd_folder / "cat/alpha.png"), ref)  # alpha dropped
  cmyk = decode.decode_image(odd_folder / "cat/cmyk.jpg")
  assert cmyk.shape == (40, 48, 3)
  assert np.abs(cmyk.astype(int) - ref).mean() < 4  # round trip RGB -> CMYK JPEG (q=100) -> RGB


def test_truncated_file_raises_naming_it(odd_folder):
  with pytest.raises(decode.CorruptImageError, match="truncated.jpg"):
    decode.decode_image(odd_folder / "cat" / "truncated.jpg")
  with pytest.raises(decode.CorruptImageError, match="<bytes>"):
    decode.decode_image(b"not an image")


def test_to_memory_skips_and_counts_corrupt_files(odd_folder, tmp_path):
  src = sources.image_folder(odd_folder, cache=False)
  assert len(src) == 9  # 4 good + truncated + alpha + gray + palette + cmyk
  with pytest.raises(ValueError, match="differ in shape"):
    sources.to_memory(src, cache_dir=False)
  small = sources.ImageFolderSource(
    [p for p in src.paths if "good" not in p], [0] * 5, ["x"], root=str(odd_folder))
  mem = sources.to_memory(small, cache_dir=False)
  assert len(mem) == 4 and [p.endswith("truncated.jpg") for p in mem.skipped] == [True]
  with pytest.raises(decode.CorruptImageError, match="truncated.jpg"):
    sources.to_memory(small, cache_dir=False, strict=True)


# ------------------------------------------------------------------ in-memory cache


def test_cache_written_once_then_loaded_without_decoding(cifar_root, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  first = sources.image_folder(cifar_root, split="test[:300]", cache=True, cache_dir=cache)
  assert isinstance(first, sources.ArraySource) and first.images.shape == (300, 32, 32, 3)
  lazy = sources.image_folder(cifar_root, split="test[:300]", cache=False)
  for i in (0, 123, 299):
    np.testing.assert_array_equal(first.images[i], lazy[i]["image"])
    assert first.labels[i] == lazy[i]["label"]
  files = sorted(p.name for p in cache.iterdir())
  assert len(files) == 3 and json.loads(next(cache.glob("*.json")).read_text())["count"] == 300

  def boom(*a, **k):
    raise AssertionError("decoded again instead of loading the cache")

  monkeypatch.setattr(sources, "decode_image", boom)
  second = sources.image_folder(cifar_root, split="test[:300]", cache=True, cache_dir=cache)
  np.testing.assert_array_equal(second.images, first.images)
  assert second.class_names == CIFAR_CLASSES


def test_auto_cache_for_small_images_only(small_folder, shared_dir, tmp_path):
  auto = sources.image_folder(small_folder, split="train", cache_dir=tmp_path / "c")
  assert isinstance(auto, sources.ArraySource)  # 32x32 images
  big = sources.image_folder(shared_dir / "data" / "food101_mini", split="test[:5]", cache_dir=tmp_path / "c")
  assert isinstance(big, sources.ImageFolderSource)
  Image.new("RGB", (40, 30), (9, 9, 9)).save(small_folder / "train" / "cat" / "zz_odd_size.png")
  mixed = sources.image_folder(small_folder, split="train", cache_dir=tmp_path / "c")
  assert isinstance(mixed, sources.ImageFolderSource) and len(mixed) == 25  # falls back to lazy decoding


def test_array_source_validates():
  imgs = np.zeros((4, 8, 8, 3), np.uint8)
  src = sources.ArraySource(imgs, [0, 1, 2, 1], class_names=["a", "b", "c"])
  assert len(src) == 4 and src[2]["label"] == 2 and src[2]["image"].shape == (8, 8, 3)
  gray = sources.ArraySource(np.zeros((2, 8, 8, 1), np.uint8), [0, 0])
  assert gray[0]["image"].shape == (8, 8, 3)
  with pytest.raises(ValueError, match="uint8"):
    sources.ArraySource(imgs.astype(np.float32), [0, 1, 2, 1])
  with pytest.raises(ValueError, match="differ in length"):
    sources.ArraySource(imgs, [0, 1])
  with pytest.raises(ValueError, match=r"\[0, 2\)"):
    sources.ArraySource(imgs, [0, 1, 2, 1], class_names=["a", "b"])


def test_resolve_dispatch(small_folder, tmp_path):
  assert len(sources.resolve(small_folder, split="test", cache=False)) == 8
  assert len(sources.resolve("small", split="test", data_dir=small_folder.parent, cache=False)) == 8
  arr = sources.ArraySource(np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
  assert sources.resolve(arr, split="train") is arr
  with pytest.raises(ValueError, match="does not exist"):
    sources.resolve(str(tmp_path / "missing_dir"), split="train")
