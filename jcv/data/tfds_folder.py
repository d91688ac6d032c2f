"""An image folder prepared offline as a real tfds dataset (ArrayRecord files), without TensorFlow.

  python -m jcv.data.tfds_folder ../shared/data/cats_vs_dogs --data-dir ~/tensorflow_datasets

writes ``DATA_DIR/cats_vs_dogs/4.0.1/`` with the features, version and file format
(``array_record``) of tfds' own ``cats_vs_dogs``, so ``tfds.data_source("cats_vs_dogs",
data_dir=DATA_DIR)`` and ``Config(dataset="cats_vs_dogs", data_dir=DATA_DIR)`` read it as a
downloaded copy. Any other name gets a dataset tfds reads from its files. tfds'
``GeneratorBasedBuilder`` writes it: in tfds 4.9 its ArrayRecord writer, the example
serialiser and the ``Image`` feature (given encoded bytes) need no TensorFlow.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import pathlib
import re
import shutil
import sys
import tempfile

from PIL import Image

from jcv.data import decode, sources

__all__ = ["main", "prepare_image_folder_as_tfds"]

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "val", "test")


def _folder_splits(root: pathlib.Path) -> dict[str, sources.ImageFolderSource]:
  """Split name -> file listing (classes from ``root/train`` as jcv's image folders take them)."""
  found = [s for s in SPLITS if (root / s).is_dir()]
  if not found:
    return {"train": sources.image_folder(root, split=None, cache=False)}
  return {("validation" if s == "val" else s): sources.image_folder(root, split=s, cache=False) for s in found}


def _encoded(path: str) -> bytes:
  """The file's own bytes when it is an RGB JPEG without EXIF rotation, else PNG of jcv's decode."""
  image = decode.decode_image(path)  # CorruptImageError names a bad file
  with Image.open(path) as img:
    if img.format == "JPEG" and img.mode == "RGB" and img.getexif().get(0x0112, 1) == 1:
      return pathlib.Path(path).read_bytes()
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="PNG")
  return out.getvalue()


def _examples(folder: sources.ImageFolderSource, strict: bool):
  """(key, example) per file; the key, ``<class>/<file>``, decides the record order."""
  skipped = 0
  for path, label in zip(folder.paths, folder.labels):
    try:
      image = _encoded(path)
    except decode.CorruptImageError as e:
      if strict:
        raise
      skipped += 1
      log.warning("skipping %s", e)
      continue
    rel = os.path.relpath(path, os.path.dirname(os.path.dirname(path)))  # <class>/<file>
    yield rel, {"image": image, "image/filename": rel, "label": int(label)}
  if skipped:
    log.warning("skipped %d corrupt image file(s) of %d in %s", skipped, len(folder), folder.root)


def _builder_class(name: str, version: str, splits: dict, class_names: list[str], strict: bool):
  import tensorflow_datasets as tfds  # slow import; only when used

  class ImageFolderAsTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """One image folder's splits."""

    VERSION = tfds.core.Version(version)
    code_path = None  # no checksums or dataset card beside this module (tfds would look there)

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self, supervised_keys=("image", "label"),
        description=f"Image folder {splits[next(iter(splits))].root} prepared by jcv.data.tfds_folder.",
        features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(), "image/filename": tfds.features.Text(),
          "label": tfds.features.ClassLabel(names=class_names)}))

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(folder) for split, folder in splits.items()}

    def _generate_examples(self, folder):
      return _examples(folder, strict)

  ImageFolderAsTfds.name = name
  return ImageFolderAsTfds


def _registered_version(name: str, class_names: list[str], data_dir) -> str | None:
  """The version of tfds' dataset ``name``, registered or in ``data_dir`` (None: neither); its labels must match."""
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=os.fspath(data_dir))  # code only: nothing is downloaded
  except tfds.core.registered.DatasetNotFoundError:
    return None
  features = builder.info.features
  names = list(getattr(features["label"], "names", None) or []) if "label" in features else []
  if names != class_names:
    raise ValueError(f"the tfds dataset {name!r} (tfds' builder, or a copy in data_dir) has the classes "
                     f"{names}, this folder {class_names}: pass another name (--name), e.g. {name}_folder")
  return str(builder.version)


def prepare_image_folder_as_tfds(
  src: str | os.PathLike, data_dir: str | os.PathLike, *, name: str | None = None, version: str | None = None,
  overwrite: bool = False, strict: bool = False,
) -> pathlib.Path:
  """Writes the image folder ``src`` as a tfds dataset ``name`` into ``data_dir``; returns its directory.

  ``src`` is ``src/<split>/<class>/<file>`` (splits train, val/validation, test; ``val`` is
  written as ``validation``) or ``src/<class>/<file>`` (one ``train`` split). Features:
  ``image`` (the file's JPEG bytes, or PNG of the decoded image for other formats, EXIF-rotated
  or non-RGB files), ``image/filename`` (``<class>/<file>``) and ``label``
  (``ClassLabel``, the sorted class folder names). tfds shuffles the records on writing, by a
  hash of ``<class>/<file>`` (the same order on every machine), so slices such as
  ``train[:80%]`` mix the classes as in a downloaded dataset. ``name``
  defaults to the folder name in snake case; a name tfds has its own builder for (e.g.
  ``cats_vs_dogs``) takes that builder's version and must have its class names. Corrupt files
  are skipped with a warning (``strict=True`` raises). An existing copy is reused unless
  ``overwrite``.
  """
  root = pathlib.Path(src).expanduser()
  if not root.is_dir():
    raise ValueError(f"image folder {os.fspath(src)!r} does not exist")
  splits = _folder_splits(root)
  class_names = splits[next(iter(splits))].class_names
  name = name or re.sub(r"[^a-z0-9]+", "_", root.resolve().name.lower()).strip("_")
  if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
    raise ValueError(f"tfds dataset name {name!r} must be snake case (a-z, 0-9, _), starting with a letter")
  data_dir = pathlib.Path(data_dir).expanduser()
  version = version or _registered_version(name, class_names, data_dir) or "1.0.0"
  target = data_dir / name / version
  if overwrite and target.exists():
    shutil.rmtree(target)
  builder = _builder_class(name, version, splits, class_names, strict)(
    data_dir=os.fspath(data_dir), file_format="array_record")
  with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; tfds wants a folder
    builder.download_and_prepare(download_dir=downloads)
  return target


def main(argv=None) -> int:
  """``python -m jcv.data.tfds_folder SRC --data-dir DIR [--name NAME]``."""
  p = argparse.ArgumentParser(prog="python -m jcv.data.tfds_folder", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("src", help="image folder: SRC/<split>/<class>/<file> or SRC/<class>/<file>")
  p.add_argument("--data-dir", required=True, help="tfds data_dir to write into")
  p.add_argument("--name", help="dataset name (default: the folder's name)")
  p.add_argument("--version", help="dataset version (default: tfds' own for its names, else 1.0.0)")
  p.add_argument("--overwrite", action="store_true", help="rewrite an existing copy")
  p.add_argument("--strict", action="store_true", help="stop at a corrupt file instead of skipping it")
  args = p.parse_args(argv)
  try:
    target = prepare_image_folder_as_tfds(args.src, args.data_dir, name=args.name, version=args.version,
                                          overwrite=args.overwrite, strict=args.strict)
  except (ValueError, decode.CorruptImageError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"prepared {target}: read it with tfds.data_source({target.parent.name!r}, data_dir="
        f"{os.fspath(target.parent.parent)!r}) or Config(dataset={target.parent.name!r}, "
        f"data_dir={os.fspath(target.parent.parent)!r})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
