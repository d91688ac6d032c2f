"""The tfds path through ``tfds.data_source`` with ``tfds.testing.mock_data`` (no download, no TF)."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jcv.data import pipeline, sources  # noqa: E402


@pytest.mark.parametrize("name", ["cifar10", "cats_vs_dogs", "food101"])
def test_mock_tfds_through_loaders(name):
  with tfds.testing.mock_data(num_examples=10, policy=tfds.testing.MockPolicy.USE_CODE):
    src = sources.resolve(name, split="train", data_dir=None)
    # CIFAR's fixed 32x32 images are decoded once into memory; the others stay lazy.
    assert isinstance(src, sources.ArraySource if name == "cifar10" else sources.TfdsSource)
    assert len(src) == 10
    lazy = sources.tfds_source(name, split="train")
    assert isinstance(lazy, sources.TfdsSource)
    np.testing.assert_array_equal(lazy[3]["image"], src[3]["image"])
    rec = src[3]
    assert rec["image"].dtype == np.uint8 and rec["image"].ndim == 3 and rec["image"].shape[-1] == 3
    assert isinstance(rec["label"], int) and 0 <= rec["label"] < len(src.class_names)
    n_classes = {"cifar10": 10, "cats_vs_dogs": 2, "food101": 101}[name]
    assert len(src.class_names) == n_classes
    train = pipeline.train_loader(src, batch_size=4, image_size=24, seed=0, process_index=0, process_count=1)
    it = iter(train)
    batch = next(it)
    assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and train.steps_per_epoch == 2
    it.close()
    ev = pipeline.eval_loader(src, batch_size=4, image_size=24, process_index=0, process_count=1)
    batches = list(ev)
    assert len(batches) == 3 and sum(int(b["mask"].sum()) for b in batches) == 10
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(labels, [src[i]["label"] for i in range(10)])


def test_offline_error_names_both_ways_out(tmp_path):
  with pytest.raises(RuntimeError) as info:
    sources.tfds_source("cifar10", split="train", data_dir=tmp_path, download=False)
  msg = str(info.value)
  assert "data_dir" in msg and "image folder" in msg and "cifar10" in msg


def test_unknown_name_is_value_error(tmp_path):
  with pytest.raises(ValueError, match="unknown tfds dataset"):
    sources.resolve("no_such_dataset_xyz", split="train", data_dir=tmp_path)


def test_download_failure_names_both_ways_out(tmp_path, monkeypatch):
  def offline(*args, **kwargs):
    raise OSError("[Errno 101] Network is unreachable")

  monkeypatch.setattr(tfds, "data_source", offline)
  with pytest.raises(RuntimeError, match="could not be downloaded") as info:
    sources.tfds_source("food101", split="train", data_dir=tmp_path, download=True)
  assert "data_dir" in str(info.value) and "image folder" in str(info.value)
  assert "Network is unreachable" in str(info.value)
