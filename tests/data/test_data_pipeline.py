"""grain loaders: exact eval coverage, per-epoch shuffles, process sharding, exact resume, bad files."""
import json

import cv2
import numpy as np
import pytest

from jcv.data import decode, pipeline, sources
from jcv.data import transforms as T


def _indexed_source(n, size=8):
  """Image i has pixel values (i % 256, i // 256, 7): the index can be read back from a batch."""
  imgs = np.zeros((n, size, size, 3), np.uint8)
  imgs[..., 0] = (np.arange(n) % 256)[:, None, None]
  imgs[..., 1] = (np.arange(n) // 256)[:, None, None]
  imgs[..., 2] = 7
  return sources.ArraySource(imgs, np.arange(n) % 3, class_names=["a", "b", "c"])


def _ids(images):
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def _take(it, k):
  return [next(it) for _ in range(k)]


# ------------------------------------------------------------------ evaluation coverage


@pytest.mark.parametrize("n,batch,procs", [(37, 5, 1), (37, 5, 2), (37, 8, 3), (40, 10, 2), (3, 4, 2)])
def test_eval_visits_every_example_exactly_once(n, batch, procs):
  src = _indexed_source(n)
  seen, lengths = [], set()
  for p in range(procs):
    loader = pipeline.eval_loader(src, batch_size=batch, image_size=8, process_index=p, process_count=procs)
    batches = list(loader)
    lengths.add(len(batches))
    assert len(batches) == len(loader)
    for b in batches:
      assert b["image"].shape == (batch, 8, 8, 3) and b["mask"].dtype == bool and b["label"].dtype == np.int32
      ids = _ids(b["image"])
      seen.extend(ids[b["mask"]].tolist())
      np.testing.assert_array_equal(b["label"][b["mask"]], ids[b["mask"]] % 3)
      assert not b["image"][~b["mask"]].any()  # padding is zeros
      assert (b["image"][b["mask"]][..., 2] == 7).all()
    masks = np.concatenate([b["mask"] for b in batches])
    assert masks.tolist() == sorted(masks.tolist(), reverse=True)  # padding only at the tail
  assert len(lengths) == 1  # every process runs the same number of eval steps
  assert sorted(seen) == list(range(n))


# ------------------------------------------------------------------ training stream


def test_train_epochs_are_permutations_that_differ_and_drop_the_tail():
  src = _indexed_source(37)
  loader = pipeline.train_loader(src, batch_size=5, image_size=8, seed=1, crop="none", process_index=0, process_count=1)
  assert loader.steps_per_epoch == 7
  it = iter(loader)
  epochs = [np.concatenate([_ids(b["image"]) for b in _take(it, 7)]) for _ in range(3)]
  for e in epochs:
    assert len(set(e.tolist())) == 35  # no repeats inside an epoch, 2 dropped
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  again = iter(pipeline.train_loader(src, batch_size=5, image_size=8, seed=1, crop="none", process_index=0,
                                     process_count=1))
  np.testing.assert_array_equal(np.concatenate([_ids(b["image"]) for b in _take(again, 7)]), epochs[0])
  other = iter(pipeline.train_loader(src, batch_size=5, image_size=8, seed=2, crop="none", process_index=0,
                                     process_count=1))
  assert not np.array_equal(np.concatenate([_ids(b["image"]) for b in _take(other, 7)]), epochs[0])
  b = next(it)
  np.testing.assert_array_equal(b["label"], _ids(b["image"]) % 3)


def test_train_processes_split_each_global_batch():
  src = _indexed_source(50)
  its = [iter(pipeline.train_loader(src, batch_size=4, image_size=8, seed=0, crop="none", process_index=p,
                                    process_count=3)) for p in range(3)]
  single = pipeline.train_loader(src, batch_size=12, image_size=8, seed=0, crop="none", process_index=0,
                                 process_count=1)
  assert single.steps_per_epoch == 4
  for step in range(5):
    parts = [_ids(next(it)["image"]) for it in its]
    assert len(set(np.concatenate(parts).tolist())) == 12
    np.testing.assert_array_equal(np.concatenate(parts), single.batch_indices(step))


@pytest.mark.parametrize("crop", ["random_resized", "pad_crop", "none"])
def test_train_crops_real_images(small_folder, crop):
  src = sources.image_folder(small_folder, split="train", cache=False)
  it = iter(pipeline.train_loader(src, batch_size=6, image_size=24, seed=0, crop=crop, flip=True,
                                  process_index=0, process_count=1))
  b = next(it)
  assert b["image"].shape == (6, 24, 24, 3) and b["image"].dtype == np.uint8 and set(b) == {"image", "label"}
  assert b["image"].std() > 10


# ------------------------------------------------------------------ exact resume


def test_state_restore_gives_identical_continuation(small_folder):
  src = sources.image_folder(small_folder, split="train", cache=False)
  kw = dict(batch_size=5, image_size=20, seed=4, crop="random_resized", flip=True, process_index=0, process_count=1)
  it = iter(pipeline.train_loader(src, **kw))
  _take(it, 6)  # crosses an epoch boundary (4 steps per epoch)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 5)
  it.close()
  for threads in (1, 3):  # a different thread count must not change the batches
    resumed = iter(pipeline.train_loader(src, num_threads=threads, **kw))
    resumed.set_state(state)
    for a, b in zip(expected, _take(resumed, 5)):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
    resumed.close()
  from_step = pipeline.train_loader(src, **kw).iter_from(6)
  np.testing.assert_array_equal(next(from_step)["image"], expected[0]["image"])
  with pytest.raises(ValueError, match="next_batch"):
    from_step.set_state({"oops": 1})


def test_worker_process_gives_the_same_batches():
  src = _indexed_source(64)
  kw = dict(batch_size=8, image_size=8, seed=0, crop="pad_crop", process_index=0, process_count=1, num_epochs=1)
  local = [b["image"] for b in pipeline.train_loader(src, **kw)]
  it = iter(pipeline.train_loader(src, num_workers=1, **kw))
  remote = list(it)
  it.close()
  assert len(local) == len(remote) == 8
  for a, b in zip(local, remote):
    np.testing.assert_array_equal(a, b["image"])


# ------------------------------------------------------------------ corrupt files


def _odd_source(odd_folder):
  src = sources.image_folder(odd_folder, cache=False)
  assert any(p.endswith("truncated.jpg") for p in src.paths)
  return src


def test_corrupt_file_is_skipped_and_counted(odd_folder):
  src = _odd_source(odd_folder)
  it = iter(pipeline.train_loader(src, batch_size=9, image_size=16, seed=0, crop="none", num_epochs=2,
                                  process_index=0, process_count=1))
  batches = list(it)
  assert len(batches) == 2 and all(b["image"].shape == (9, 16, 16, 3) for b in batches)
  assert it.num_skipped == 2 and it.get_state()["num_skipped"] == 2  # once per epoch
  ev = iter(pipeline.eval_loader(src, batch_size=4, image_size=16, process_index=0, process_count=1))
  masks = np.concatenate([b["mask"] for b in ev])
  assert ev.num_skipped == 1 and masks.sum() == 8
  assert not masks[src.paths.index(next(p for p in src.paths if p.endswith("truncated.jpg")))]


def test_strict_raises_naming_the_file(odd_folder):
  src = _odd_source(odd_folder)
  it = iter(pipeline.eval_loader(src, batch_size=9, image_size=16, strict=True, process_index=0, process_count=1))
  with pytest.raises(decode.CorruptImageError, match="truncated.jpg"):
    next(it)


def test_bad_arguments():
  src = _indexed_source(10)
  with pytest.raises(ValueError, match="crop must be one of"):
    pipeline.train_loader(src, batch_size=2, image_size=8, seed=0, crop="centre", process_index=0, process_count=1)
  with pytest.raises(ValueError, match="seed must be a non-negative int"):
    pipeline.train_loader(src, batch_size=2, image_size=8, seed=-1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match="fewer than one global batch"):
    pipeline.train_loader(src, batch_size=8, image_size=8, seed=0, process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.eval_loader(src, batch_size=2, image_size=8, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.eval_loader(src, batch_size=0, image_size=8, process_index=0, process_count=1)
  with pytest.raises(TypeError, match="infinite"):
    len(pipeline.train_loader(src, batch_size=2, image_size=8, seed=0, process_index=0, process_count=1))


def test_default_process_info_comes_from_jax():
  loader = pipeline.eval_loader(_indexed_source(10), batch_size=4, image_size=8)
  assert len(loader) == 3  # one process in tests


# ------------------------------------------------------------------ host transforms


def test_sample_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(300):
    top, left, h, w = T.sample_crop_box(rng, 120, 90, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    assert 0 <= top and top + h <= 120 and 0 <= left and left + w <= 90
    assert 0.2 - 0.03 <= h * w / (120 * 90) <= 0.6 + 0.03
    assert 0.5 - 0.05 <= w / h <= 2.0 + 0.05
  # Impossible request: torchvision's fallback, the centred crop with the ratio clamped.
  assert T.sample_crop_box(rng, 100, 10, scale=(0.9, 1.0), ratio=(1.0, 1.0)) == (45, 0, 10, 10)


def test_host_geometry_matches_numpy_and_opencv(cifar_root):
  img = decode.decode_image(cifar_root / "test" / "cat" / "0001.jpg")
  np.testing.assert_array_equal(T.center_crop(img, 20), img[6:26, 6:26])
  padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
  out = T.pad_crop(np.random.default_rng(3), img, padding=4)
  assert any(np.array_equal(out, padded[t:t + 32, l:l + 32]) for t in range(9) for l in range(9))
  np.testing.assert_array_equal(T.random_flip(np.random.default_rng(0), img, probability=1.0), img[:, ::-1])
  up = T.resize_shorter(img, 48)
  ref = cv2.resize(img, (48, 48), interpolation=cv2.INTER_LINEAR)
  assert up.shape == (48, 48, 3) and np.abs(up.astype(int) - ref).max() <= 2
  rect = np.ascontiguousarray(np.concatenate([img, img[:, :16]], axis=1))  # 32 x 48
  small = T.resize_shorter(rect, 16)
  assert small.shape == (16, 24, 3)
  # Antialiased bilinear 2x reduction = separable triangle filter [1, 3, 3, 1] / 8 (interior pixels).
  k = np.array([1, 3, 3, 1]) / 8
  f = rect.astype(float)
  rows = sum(k[j] * f[1 + j:1 + j + 27:2] for j in range(4))  # output row i uses input rows 2i-1..2i+2
  ref = sum(k[j] * rows[:, 1 + j:1 + j + 43:2] for j in range(4))
  assert np.abs(small[1:15, 1:23].astype(float) - ref).max() <= 1.01
  assert np.abs(small.astype(int) - cv2.resize(rect, (24, 16), interpolation=cv2.INTER_AREA)).mean() < 8
  assert T.eval_resize_crop(img, 32) is img
  assert T.eval_resize_crop(rect, 16, crop_fraction=1.0).shape == (16, 16, 3)


def test_in_memory_batches_are_padded_windows_or_their_mirror(cifar_root, tmp_path):
  src = sources.image_folder(cifar_root, split="test[:64]", cache=True, cache_dir=tmp_path)
  it = iter(pipeline.train_loader(src, batch_size=16, image_size=32, seed=0, crop="pad_crop", flip=True,
                                  process_index=0, process_count=1))
  batch = next(it)
  idx = pipeline.train_loader(src, batch_size=16, image_size=32, seed=0, process_index=0,
                              process_count=1).batch_indices(0)
  flips = 0
  for out, i in zip(batch["image"], idx):
    padded = np.pad(src.images[i], ((4, 4), (4, 4), (0, 0)))
    views = [padded[t:t + 32, l:l + 32] for t in range(9) for l in range(9)]
    plain = any(np.array_equal(out, v) for v in views)
    mirrored = any(np.array_equal(out, v[:, ::-1]) for v in views)
    assert plain or mirrored
    flips += mirrored and not plain
    assert batch["label"][list(idx).index(i)] == src.labels[i]
  assert 0 < flips < 16


@pytest.mark.parametrize("in_memory", [True, False])
def test_alternating_flip_mirrors_each_image_in_every_other_epoch(cifar_root, tmp_path, in_memory):
  """airbench's scheme: per image, epoch e is mirrored iff epoch e+1 is not; about half per epoch."""
  src = sources.image_folder(cifar_root, split="test[:32]", cache=in_memory, cache_dir=tmp_path)
  kw = dict(batch_size=16, image_size=32, seed=3, crop="none", process_index=0, process_count=1)
  loader = pipeline.train_loader(src, flip="alternate", **kw)
  it = iter(loader)
  mirrored = {}  # (epoch, source index) -> was the image mirrored
  for step in range(4 * loader.steps_per_epoch):
    batch, epoch = next(it), step // loader.steps_per_epoch
    for out, i in zip(batch["image"], loader.batch_indices(step)):
      plain = T.center_crop(T.resize_shorter(np.asarray(src[int(i)]["image"]), 32), 32)
      assert np.array_equal(out, plain) or np.array_equal(out, plain[:, ::-1])
      mirrored[epoch, int(i)] = not np.array_equal(out, plain)
  for i in range(32):
    assert [mirrored[e, i] for e in range(4)] in ([True, False, True, False], [False, True, False, True])
  assert 8 <= sum(mirrored[0, i] for i in range(32)) <= 24
  with pytest.raises(ValueError, match="flip"):
    pipeline.train_loader(src, flip="sometimes", **kw)


@pytest.mark.parametrize("name", ["cifar10", "cats_vs_dogs", "food101_mini"])
def test_loaders_feed_batches_from_the_shared_folders(shared_dir, name):
  root = shared_dir / "data" / name
  train = sources.image_folder(root, split="train", cache=False)
  test = sources.image_folder(root, split="test", cache=False)
  it = iter(pipeline.train_loader(train, batch_size=4, image_size=48, seed=0, process_index=0, process_count=1))
  b = next(it)
  it.close()
  assert b["image"].shape == (4, 48, 48, 3) and b["image"].dtype == np.uint8 and b["image"].std() > 5
  assert ((b["label"] >= 0) & (b["label"] < len(train.class_names))).all()
  ev = pipeline.eval_loader(test, batch_size=4, image_size=48, process_index=0, process_count=1)
  assert len(ev) == len(test) // 4
  e = next(iter(ev))
  assert e["mask"].all() and e["image"].shape == (4, 48, 48, 3)
  np.testing.assert_array_equal(e["label"], test.labels[:4])
