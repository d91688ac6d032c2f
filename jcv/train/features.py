"""Frozen-bottom features, computed once and cached, and loaders that train on them.

When the bottom stages of a staged model (``model.stage_names()``) are frozen and no
augmentation reaches them, :func:`jcv.train.fit` (``Config.feature_cache``) runs them once
over the data (:func:`cache_features`) and trains the top on the arrays
(:class:`FeatureLoader`) with the same train step as every other run.

A cache file is named by a digest of everything that determines its content
(:func:`cache_key`): the bottom's structure and variables (so the weights), the cut, the image
size and eval view, the extra views, the normalisation, the data (file names, sizes and
modification times, or the arrays), the split and seed, and the code version (jcv and jax
versions, and the source of the models, transforms and this module). Changing any
of them computes new features; stale files are never read.
"""
from __future__ import annotations

import functools
import hashlib
import json
import pathlib
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jcv import cachefile
from jcv.train import step as step_lib

__all__ = [
    "CACHE_FORMAT", "FeatureLoader", "cache_features", "cache_key", "compute_features", "merge_variables",
    "pool_cached", "source_fingerprint", "split_model", "top_variables", "tree_digest", "cut_stage", "cache_stage",
    "feature_data",
]

CACHE_FORMAT = 2  # bump when the content of a cache file changes for the same key


def split_model(model, stage: int):
  """(bottom, top) modules: stages ``[0, stage)`` and ``[stage, ...)`` + head of a staged model.

  ``stage == len(model.stage_names())`` puts the whole backbone in ``bottom``, which then
  returns pooled features. Parameter names are unchanged, so variables split and merge by
  top-level name.
  """
  count = len(model.stage_names())
  if not 0 < stage <= count:
    raise ValueError(f"stage must be in [1, {count}], got {stage}")
  if stage == count:
    bottom = model.clone(num_classes=0, start_stage=0, end_stage=None, frozen_stages=0)
  else:
    bottom = model.clone(start_stage=0, end_stage=stage, frozen_stages=0)
  top = model.clone(start_stage=stage, end_stage=None, frozen_stages=0)
  return bottom, top


def _subtree(variables, names):
  return {col: {k: v for k, v in tree.items() if k in names} for col, tree in variables.items()}


def merge_variables(variables, *parts):
  """``variables`` with the top-level entries of every collection replaced by those in ``parts``."""
  out = {col: dict(tree) for col, tree in variables.items()}
  for part in parts:
    for col, tree in part.items():
      out.setdefault(col, {}).update(tree)
  return out


def top_variables(variables: dict, model, stage: int) -> dict:
  """The part of ``variables`` that the top of :func:`split_model` (``stage``) uses."""
  names = set(model.stage_names()[stage:]) | {"head"}
  return _subtree(variables, names)


def compute_features(apply_fn, variables, batches: Iterable[dict], *, mean=None, std=None,
                     flip: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Runs ``apply_fn(variables, x)`` over eval-style batches once -> (features, labels).

  ``batches`` yield {"image": uint8 NHWC, "label", optional "mask"}; masked-out padding is
  dropped. ``flip=True`` appends the horizontally flipped images as a second view (features
  [2N, ...], labels repeated).
  """
  @jax.jit
  def run(images):
    x = step_lib.to_model_input(images, mean=mean, std=std)
    out = apply_fn(variables, x)
    return (out, apply_fn(variables, x[:, :, ::-1, :])) if flip else (out,)

  views, labels = ([], []), []
  for batch in batches:
    keep = np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool)), bool)
    for i, out in enumerate(run(jnp.asarray(batch["image"]))):
      views[i].append(np.asarray(out)[keep])
    labels.append(np.asarray(batch["label"])[keep])
  features = np.concatenate(views[0] + views[1]) if flip else np.concatenate(views[0])
  labels = np.concatenate(labels)
  return features, (np.concatenate([labels, labels]) if flip else labels)


# ------------------------------------------------------------------ cache keys


def tree_digest(tree) -> str:
  """sha256 of a pytree's paths, shapes, dtypes and bytes (e.g. a model's weights)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
    leaf = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|".encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()


def source_fingerprint(source) -> str:
  """A digest of a source's content: an image folder's class names, file names, labels, sizes
  and modification times; an in-memory source's arrays; else its description, length and
  first and last records."""
  h = hashlib.sha256(json.dumps(list(getattr(source, "class_names", []) or [])).encode())
  if hasattr(source, "paths"):
    for p, label in zip(source.paths, source.labels):
      st = pathlib.Path(p).stat()
      h.update(f"{p}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  elif hasattr(source, "images"):
    h.update(np.ascontiguousarray(source.images).tobytes())
    h.update(np.ascontiguousarray(source.labels).tobytes())
  else:
    h.update(f"{source!r}|{len(source)}".encode())
    for i in {0, len(source) - 1} if len(source) else ():
      record = source[i]
      h.update(np.asarray(record["image"]).tobytes() + str(record["label"]).encode())
  return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
  """sha256 of the source of the code that computes features: the models, the image decoding
  and transforms, the input normalisation and this module."""
  import jcv
  root = pathlib.Path(jcv.__file__).parent
  files = sorted((root / "models").glob("*.py")) + [root / "data" / n for n in ("decode.py", "transforms.py", "pipeline.py")]
  files += [root / "train" / "step.py", pathlib.Path(__file__)]
  h = hashlib.sha256()
  for f in files:
    if f.is_file():
      h.update(f.name.encode() + f.read_bytes())
  return h.hexdigest()


def cache_key(**parts) -> str:
  """A digest of ``parts`` (JSON-able) plus the cache format, the jcv/jax versions and the
  source of the code that computes the features (a code change computes new features)."""
  import jcv
  parts = {**parts, "format": CACHE_FORMAT, "jcv": getattr(jcv, "__version__", "?"), "jax": jax.__version__,
           "code": _code_digest()}
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


# ------------------------------------------------------------------ computing and caching


def cache_features(model, variables: dict, sources: dict, *, stage: int, image_size: int,
                   crop_fraction: float = 0.875, mean=None, std=None, flip: bool = True,
                   crop_views: int = 0, seed: int = 0, batch_size: int = 64, directory=None,
                   log=print) -> dict:
  """Runs the bottom ``stage`` stages of ``model`` once over every source -> {split: (x, y)}.

  Images get the eval transform (resize, centre crop to ``image_size``); ``flip`` adds the
  mirrored images of the "train" split as a second view; ``crop_views=K`` adds K more views
  of it made by the training transform (random-resized crop, scale 0.25-1, and flip, seeded
  by ``seed``), an offline stand-in for augmentation. With ``directory``, each split is saved
  there as ``<split>-<key>.npz`` (key: :func:`cache_key` of everything above, the bottom's
  variables and the source's :func:`source_fingerprint`) and read back when the key matches.
  """
  from jcv.data import pipeline

  bottom, _ = split_model(model, stage)
  bottom_vars = _subtree(variables, set(model.stage_names()[:stage]))
  apply = functools.partial(bottom.apply, train=False)
  weights = tree_digest(bottom_vars) if directory is not None else None
  cached, started = {}, time.time()
  for split, source in sources.items():
    views = 2 if flip and split == "train" else 1
    crops = crop_views if split == "train" else 0
    path = None
    if directory is not None:
      key = cache_key(model=repr(bottom), stage=stage, weights=weights, image_size=image_size,
                      crop_fraction=crop_fraction, mean=mean, std=std, views=views, crops=crops,
                      seed=seed, split=split, data=source_fingerprint(source))
      path = pathlib.Path(directory) / f"{split}-{key}.npz"
    hit = None if path is None else cachefile.load(lambda: _read_npz(path), [path], what="feature")
    if hit is not None:
      cached[split] = hit
      if log is not None:
        log(f"loaded cached {split} features from {path}")
      continue
    loader = pipeline.eval_loader(source, batch_size=batch_size, image_size=image_size,
                                  crop_fraction=crop_fraction)
    cached[split] = compute_features(apply, bottom_vars, loader, mean=mean, std=std, flip=views == 2)
    if crops:
      train = pipeline.train_loader(source, batch_size=batch_size, image_size=image_size, seed=seed,
                                    crop="random_resized", flip=True, scale=(0.25, 1.0))
      batches = (b for _, b in zip(range(crops * train.steps_per_epoch), train.iter_from(0)))
      extra = compute_features(apply, bottom_vars, batches, mean=mean, std=std)
      cached[split] = tuple(np.concatenate([a, b]) for a, b in zip(cached[split], extra))
    if path is not None:
      x, y = cached[split]
      cachefile.save(lambda tmp: np.savez(tmp[0], features=x, labels=y), [path], what="feature")
    if log is not None:
      log(f"cached {split}: features {cached[split][0].shape}, {time.time() - started:.1f}s so far")
  return cached


def _read_npz(path) -> tuple[np.ndarray, np.ndarray]:
  with open(path, "rb") as f, np.load(f, allow_pickle=False) as data:  # closed even when damaged
    features, labels = data["features"], data["labels"]
  if len(features) != len(labels):
    raise ValueError(f"{len(features)} features for {len(labels)} labels")
  return features, labels


def pool_cached(model, variables: dict, cached: dict, *, stage: int, batch_size: int = 128) -> dict:
  """Runs the stages ``[stage, ...)`` of ``model`` (inference mode) over cached feature maps
  -> {split: (pooled features, labels)}."""
  names = model.stage_names()
  rest = model.clone(num_classes=0, start_stage=stage, end_stage=None, frozen_stages=0)
  run = jax.jit(functools.partial(rest.apply, _subtree(variables, set(names[stage:]))))
  return {split: (np.concatenate([np.asarray(run(x[i:i + batch_size]))
                                  for i in range(0, len(x), batch_size)]), y)
          for split, (x, y) in cached.items()}


# ------------------------------------------------------------------ loaders over arrays


class FeatureLoader:
  """Batches of cached ``(features, labels)`` with the interface of jcv.data.pipeline loaders.

  ``train=True``: endless, reshuffled every epoch (``numpy.random.default_rng(seed)``, one
  permutation per epoch), ``len // batch_size`` steps per epoch, resumable (``iter_from``).
  ``train=False``: one pass in order, the last batch padded and masked (``"mask"``).
  """

  def __init__(self, features, labels, *, batch_size: int, seed: int = 0, train: bool = True):
    self.features, self.labels = np.asarray(features), np.asarray(labels)
    self.batch_size, self.seed, self.train = int(batch_size), seed, train
    n = len(self.labels)
    if train and n < self.batch_size:
      raise ValueError(f"{n} cached training examples are fewer than one batch of {self.batch_size}")
    self.steps_per_epoch = n // self.batch_size if train else -(-n // self.batch_size)
    self._orders = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:  # the permutations follow one generator, epoch after epoch
      rng = np.random.default_rng(self.seed)
      for e in range(epoch + 1):
        order = rng.permutation(len(self.labels))
      self._orders = {epoch: order}
    return self._orders[epoch]

  def batch_indices(self, step: int) -> np.ndarray:
    """Example indices of batch ``step`` (eval: -1 marks padding)."""
    if self.train:
      epoch, j = divmod(int(step), self.steps_per_epoch)
      return self._order(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
    idx = np.arange(step * self.batch_size, (step + 1) * self.batch_size)
    return np.where(idx < len(self.labels), idx, -1)

  def batch(self, step: int) -> dict:
    """Batch ``step`` as {"image", "label"} (+ "mask" when not training)."""
    idx = self.batch_indices(step)
    keep = idx >= 0
    safe = np.where(keep, idx, 0)
    out = {"image": self.features[safe], "label": self.labels[safe].astype(np.int32)}
    if not self.train:
      out["image"] = np.where(keep.reshape((-1,) + (1,) * (out["image"].ndim - 1)), out["image"], 0)
      out["label"] = np.where(keep, out["label"], 0)
      out["mask"] = keep
    return out

  def iter_from(self, step: int):
    """An iterator whose first batch is batch ``step``."""
    return _FeatureIterator(self, step)

  def __iter__(self):
    return self.iter_from(0)


class _FeatureIterator:
  def __init__(self, loader, step):
    self.loader, self.step = loader, int(step)

  def __iter__(self):
    return self

  def __next__(self):
    if not self.loader.train and self.step >= self.loader.steps_per_epoch:
      raise StopIteration
    out = self.loader.batch(self.step)
    self.step += 1
    return out

  def get_state(self) -> dict:
    return {"step": self.step}

  def set_state(self, state: dict) -> None:
    self.step = int(state["step"])


def cut_stage(config, model) -> int:
  """Where a phase's frozen bottom ends: the stage count for ``trainable="head"``, count - N
  for ``trainable=N``, 0 (nothing frozen) for ``"all"`` and ``"backbone"``."""
  from jcv.train import build
  if config.init.trainable == "all":
    return 0
  return len(model.stage_names()) - build.trainable_stages(config, model)


def cache_stage(config, model, cuts: list[int]) -> int:
  """The stage whose features a run caches: the lowest cut of its cached phases, or lower
  (``init.feature_cache.stage``, negative from the top) so other runs can share them."""
  base = min([c for c in cuts if c] or [0])
  stage = config.init.feature_cache.stage
  if not base or stage is None:
    return base
  stage += len(model.stage_names()) if stage < 0 else 0
  if not 0 < stage <= base:
    raise ValueError(f"init.feature_cache.stage {config.init.feature_cache.stage} must be in [1, {base}] (or "
                     "negative, from the top), at or below the lowest frozen stage of the cached phases")
  return stage


def feature_data(config, model, variables, cut: int, base: int, *, train_src, eval_src, workdir):
  """A cached-feature data source for a phase training the stages from ``cut`` up on features
  cached at stage ``base``: (phase config, top model, top variables, loaders)."""
  from jcv.train import build
  options, count = config.init.feature_cache, len(model.stage_names())
  if cut not in (base, count):
    raise ValueError(f"a phase training from stage {cut} cannot use features cached at stage {base}: "
                     "the cached phases of a run train the same top stages, or the head alone")
  sources = {"train": train_src, **({"eval": eval_src} if eval_src is not None else {})}
  cached = cache_features(model, variables, sources, stage=base, image_size=config.data.image_size,
                          crop_fraction=config.evaluation.crop_fraction, mean=config.data.mean, std=config.data.std,
                          flip=options.flip, crop_views=options.crop_views, seed=config.run.seed,
                          directory=options.directory or pathlib.Path(workdir) / "features")
  if cut == count and base < count:  # the head alone: run the frozen top stages once more
    cached = pool_cached(model, variables, cached, stage=base)
  phase_model = model.clone(**build.stage_options(build.train_config(config, model)))
  _, top = split_model(phase_model, cut)
  x, y = cached["train"]
  batch = min(config.data.batch_size, len(y))
  data = {"train_ld": FeatureLoader(x, y, batch_size=batch, seed=config.run.seed),
          "eval_ld": FeatureLoader(*cached["eval"], batch_size=batch, train=False) if "eval" in cached else None,
          "input_shape": x.shape[1:]}
  phase = config.replace(data={"batch_size": batch}, evaluation={"batch_size": batch})
  return phase, top, top_variables(variables, model, cut), data
