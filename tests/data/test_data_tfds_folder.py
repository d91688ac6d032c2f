"""A real tfds dataset prepared offline from real cats_vs_dogs files, read through
``tfds.data_source`` and trained from with ``jcv.train.fit`` (no TensorFlow installed)."""
import json
import shutil

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from jcv.data import pipeline, sources, tfds_folder  # noqa: E402

PER_CLASS = {"train": 12, "test": 4}  # 32 real photos


@pytest.fixture(scope="module")
def folder(tmp_path_factory, shared_dir):
  """tmp/cats_vs_dogs/{train,test}/{cat,dog}/ with the first real photos of each class."""
  root = tmp_path_factory.mktemp("folder") / "cats_vs_dogs"
  for split, n in PER_CLASS.items():
    for cls in ("cat", "dog"):
      (root / split / cls).mkdir(parents=True)
      for f in sorted((shared_dir / "data" / "cats_vs_dogs" / split / cls).iterdir())[:n]:
        shutil.copy(f, root / split / cls / f.name)
  return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, folder):
  out = tmp_path_factory.mktemp("tfds")
  target = tfds_folder.prepare_image_folder_as_tfds(folder, out)
  assert target == out / "cats_vs_dogs" / "4.0.1"  # tfds' own name and version: read as a download
  return out


def _filenames(data_dir, split):
  raw = tfds.data_source("cats_vs_dogs", split=split, data_dir=data_dir, download=False,
                         decoders={"image": tfds.decode.SkipDecoding()})
  return [raw[i]["image/filename"].decode() for i in range(len(raw))]


def test_records_are_the_files_shuffled_as_tfds_does(folder, data_dir, tmp_path):
  raw = tfds.data_source("cats_vs_dogs", split="train", data_dir=data_dir, download=False,
                         decoders={"image": tfds.decode.SkipDecoding()})
  info = raw.dataset_info
  assert info.features["label"].names == ["cat", "dog"] and info.file_format.value == "array_record"
  assert {s: info.splits[s].num_examples for s in ("train", "test")} == {"train": 24, "test": 8}
  records = {raw[i]["image/filename"].decode(): raw[i] for i in range(len(raw))}
  listing = sources.image_folder(folder, split="train", cache=False)
  assert sorted(records) == sorted("/".join(p.split("/")[-2:]) for p in listing.paths)
  for path, label in zip(listing.paths, listing.labels):
    rec = records["/".join(path.split("/")[-2:])]
    assert rec["image"] == open(path, "rb").read() and rec["label"] == label  # the JPEG bytes as they are
  # Written shuffled like a download, so a slice mixes the classes; the same order every time.
  order = list(records)
  assert {name.split("/")[0] for name in order[:8]} == {"cat", "dog"}
  again = tfds_folder.prepare_image_folder_as_tfds(folder, tmp_path)
  assert _filenames(again.parent.parent, "train") == order


def test_same_batches_through_tfds_and_the_folder(folder, data_dir):
  # Records are in tfds' shuffled order, so the folder's files are listed in that order here.
  via_tfds = sources.resolve("cats_vs_dogs", split="train", data_dir=data_dir)
  assert isinstance(via_tfds, sources.TfdsSource) and via_tfds.class_names == ["cat", "dog"]
  names = _filenames(data_dir, "train")
  via_folder = sources.ImageFolderSource([str(folder / "train" / n) for n in names],
                                         [["cat", "dog"].index(n.split("/")[0]) for n in names], ["cat", "dog"])
  by_file = sources.resolve(str(folder), split="train", cache=False)  # jcv's own listing: sorted by file
  for i, path in enumerate(by_file.paths):  # sorted-by-file content: every image decodes the same
    j = names.index("/".join(path.split("/")[-2:]))
    assert np.abs(via_tfds[j]["image"].astype(int) - by_file[i]["image"]).max() <= 3
  kw = dict(batch_size=8, image_size=48, seed=3, process_index=0, process_count=1)
  a, b = iter(pipeline.train_loader(via_tfds, **kw)), iter(pipeline.train_loader(via_folder, **kw))
  for _ in range(4):  # more than an epoch (3 batches): two different permutations
    x, y = next(a), next(b)
    np.testing.assert_array_equal(x["label"], y["label"])
    # tfds decodes with OpenCV, jcv with PIL: the same libjpeg output on these files
    assert np.abs(x["image"].astype(int) - y["image"]).max() <= 3
  a.close()
  b.close()


def test_fit_trains_from_the_tfds_name(data_dir, tmp_path):
  from jcv.train import Augment, Config, Data, Evaluation, Model, Optim, Run, fit
  cfg = Config(data=Data(dataset="cats_vs_dogs", data_dir=str(data_dir), image_size=32, crop="random_resized",
                         batch_size=8),
               augment=Augment(ops=("flip", ("affine", {"rotation": 10, "zoom": 0.1}))),
               model=Model(name="advanced_cnn", options={"widths": (8,), "convs_per_stage": 1, "hidden": 16}),
               optim=Optim(name="sgd", learning_rate=0.01), evaluation=Evaluation(batch_size=8),
               run=Run(length="2 steps", progress=False, plots=False, compilation_cache=None))
  results = fit(cfg, workdir=tmp_path / "run")
  assert results["steps"] == 2 and results["steps_per_epoch"] == 3  # 24 training records
  assert results["final"]["eval"]["n"] == 8 and np.isfinite(results["final"]["eval"]["loss"])  # the test split
  assert json.loads((tmp_path / "run" / "class_names.json").read_text()) == ["cat", "dog"]


def test_cli_flat_folder_other_name_and_errors(folder, tmp_path, capsys):
  assert tfds_folder.main([str(folder / "train"), "--data-dir", str(tmp_path), "--name", "my_pets"]) == 0
  assert "my_pets" in capsys.readouterr().out
  src = sources.resolve("my_pets", split="train", data_dir=tmp_path)  # tfds reads it from its files
  assert len(src) == 24 and src.class_names == ["cat", "dog"]
  assert not (tmp_path / "downloads").exists()
  assert tfds_folder.main([str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 2
  assert "does not exist" in capsys.readouterr().err
  wrong = tmp_path / "src" / "cifar10"  # tfds' own cifar10 has ten classes
  shutil.copytree(folder / "test", wrong)
  assert tfds_folder.main([str(wrong), "--data-dir", str(tmp_path)]) == 2
  assert "--name" in capsys.readouterr().err
