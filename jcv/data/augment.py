"""On-device augmentation: pure, jit-able functions of ``(key, images)`` applied in the train step.

Images are batches [B, H, W, C]. ``random_flip``, ``pad_and_crop`` and ``cutout`` work on
any dtype; the others expect float images in [0, 1] (what :func:`make_augment` produces from
uint8). Every example gets its own random draw. Labels for ``mixup``/``cutmix`` are
one-hot or soft [B, num_classes]. Rotation, shift, zoom and shear live in :mod:`jcv.data.affine`.

:func:`make_augment` composes a list of ops into one
``fn(key, images_uint8, labels_int) -> (images_float32, soft_labels)``.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Sequence

import dm_pix as pix
import jax
import jax.numpy as jnp

from jcv.data import affine

__all__ = [
  "OPS", "color_jitter", "cutmix", "cutout", "label_smoothing", "make_augment", "mixup", "normalize",
  "pad_and_crop", "random_erasing", "random_flip", "random_resized_crop", "scale_to_range", "tta_flip",
  "tta_multicrop", "tta_translate",
]

Array = jax.Array


def _check_batch(images, name):
  if images.ndim != 4:
    raise ValueError(f"{name} expects a batch of images [B, H, W, C]; got shape {images.shape}")


def _per_example(mask, images):
  return mask.reshape((-1,) + (1,) * (images.ndim - 1))


# ----------------------------------------------------------------------------- geometry


def random_flip(key: Array, images: Array, *, probability: float = 0.5) -> Array:
  """Flips each image left-right with ``probability``."""
  _check_batch(images, "random_flip")
  flip = jax.random.bernoulli(key, probability, (images.shape[0],))
  return jnp.where(_per_example(flip, images), images[:, :, ::-1], images)


def pad_and_crop(key: Array, images: Array, *, padding: int = 4, mode: str = "constant") -> Array:
  """Pads ``padding`` pixels per side (zeros, or ``mode="reflect"``) and random-crops back (CIFAR)."""
  _check_batch(images, "pad_and_crop")
  if padding < 0:
    raise ValueError(f"padding must be >= 0; got {padding}")
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)
  crop = lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def _sample_boxes(key, batch, height, width, scale, ratio, attempts=10, extra=0):
  """Inception-style boxes (top, left, h, w) as floats [B] each, with the torchvision fallback.

  One uniform draw feeds everything (cheap to compile). Also returns whether a box was
  found within ``attempts`` (else the fallback was used) and ``extra`` more uniform columns
  [B, extra] for the caller's own use.
  """
  u = jax.random.uniform(key, (batch, 2 * attempts + 2 + extra))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :attempts])
  log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, attempts:2 * attempts]
  aspect = jnp.exp(log_r)
  w = jnp.round(jnp.sqrt(area * aspect))
  h = jnp.round(jnp.sqrt(area / aspect))
  ok = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
  first = jnp.argmax(ok, axis=1)
  any_ok = ok.any(axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  in_ratio = width / height
  fb_w = width if in_ratio <= max(ratio) else round(height * max(ratio))
  fb_h = height if in_ratio >= min(ratio) else round(width / min(ratio))
  h = jnp.where(any_ok, pick(h), fb_h)
  w = jnp.where(any_ok, pick(w), fb_w)
  pos = u[:, 2 * attempts:2 * attempts + 2]
  top = jnp.where(any_ok, jnp.floor(pos[:, 0] * (height - h + 1)), (height - h) // 2)
  left = jnp.where(any_ok, jnp.floor(pos[:, 1] * (width - w + 1)), (width - w) // 2)
  return (top, left, h, w), any_ok, u[:, 2 * attempts + 2:]


def random_resized_crop(
  key: Array, images: Array, *, size: int | tuple[int, int],
  scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Array:
  """Inception-style crop per image (area fraction in ``scale``, log-uniform aspect in
  ``ratio``), resized bilinearly (antialiased) to ``size``. Returns float32."""
  _check_batch(images, "random_resized_crop")
  if not (0 < scale[0] <= scale[1] <= 1) or not (0 < ratio[0] <= ratio[1]):
    raise ValueError(f"need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]; got {scale}, {ratio}")
  out_h, out_w = (size, size) if isinstance(size, int) else size
  b, h, w, _ = images.shape
  (top, left, ch, cw), _, _ = _sample_boxes(key, b, h, w, scale, ratio)
  sy, sx = out_h / ch, out_w / cw

  def one(im, sy, sx, ty, tx):
    return jax.image.scale_and_translate(
      im.astype(jnp.float32), (out_h, out_w, im.shape[-1]), (0, 1), jnp.stack([sy, sx]), jnp.stack([ty, tx]),
      method="linear", antialias=True)

  return jax.vmap(one)(images, sy, sx, -top * sy, -left * sx)


# ----------------------------------------------------------------------------- colour


def color_jitter(
  key: Array, images: Array, *, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0,
  hue: float = 0.0,
) -> Array:
  """torchvision-style ColorJitter per image, in the fixed order brightness, contrast,
  saturation, hue. Factors are uniform in ``[max(0, 1 - x), 1 + x]`` (brightness scales,
  contrast blends with the mean grey level, saturation with the grey image); hue shifts by
  a uniform ``[-hue, hue]`` fraction of the colour circle (``hue <= 0.5``). Float [0, 1] in and out.
  """
  _check_batch(images, "color_jitter")
  for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
    if v < 0:
      raise ValueError(f"{name} must be >= 0; got {v}")
  if not 0 <= hue <= 0.5:
    raise ValueError(f"hue must be in [0, 0.5]; got {hue}")
  b = images.shape[0]
  keys = jax.random.split(key, 4)
  shape = (b, 1, 1, 1)
  factor = lambda k, x: jax.random.uniform(k, shape, minval=max(0.0, 1 - x), maxval=1 + x)
  x = images.astype(jnp.float32)
  if brightness:
    x = jnp.clip(x * factor(keys[0], brightness), 0, 1)
  if contrast:
    mean = jnp.mean(pix.rgb_to_grayscale(x, keep_dims=False), axis=(1, 2)).reshape(shape)
    f = factor(keys[1], contrast)
    x = jnp.clip(f * x + (1 - f) * mean, 0, 1)
  if saturation:
    gray = pix.rgb_to_grayscale(x, keep_dims=True)
    f = factor(keys[2], saturation)
    x = jnp.clip(f * x + (1 - f) * gray, 0, 1)
  if hue:
    delta = jax.random.uniform(keys[3], (b, 1, 1), minval=-hue, maxval=hue)
    x = jnp.clip(pix.adjust_hue(x, delta), 0, 1)
  return x


def normalize(images: Array, *, mean: Sequence[float], std: Sequence[float]) -> Array:
  """``(images - mean) / std`` per channel (same units as the images)."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def scale_to_range(images: Array, *, low: float = -1.0, high: float = 1.0) -> Array:
  """Maps [0, 1] images linearly to [low, high] (MobileNet/Inception inputs use [-1, 1])."""
  return images.astype(jnp.float32) * (high - low) + low


# ----------------------------------------------------------------------------- erasing


def _box_mask(top, left, h, w, height, width):
  """Boolean [B, H, W, 1] masks of the boxes [top, top + h) x [left, left + w)."""
  ys = jnp.arange(height)[None, :, None]
  xs = jnp.arange(width)[None, None, :]
  r = lambda a: a[:, None, None]
  inside = (ys >= r(top)) & (ys < r(top + h)) & (xs >= r(left)) & (xs < r(left + w))
  return inside[..., None]


def random_erasing(
  key: Array, images: Array, *, probability: float = 0.25, scale: tuple[float, float] = (0.02, 1 / 3),
  ratio: tuple[float, float] = (0.3, 3.3), value: float | str = 0.0,
) -> Array:
  """Random erasing (Zhong et al. 2017): with ``probability`` per image, a box of area
  fraction in ``scale`` and aspect in ``ratio`` is set to ``value`` (a number, or
  ``"random"`` for per-pixel N(0, 1) noise as in timm; the result is then float32)."""
  _check_batch(images, "random_erasing")
  b, h, w, _ = images.shape
  (top, left, bh, bw), found, u = _sample_boxes(key, b, h, w, scale, ratio, extra=1)
  on = (u[:, 0] < probability) & found  # like torchvision: no box within 10 tries, no erasing
  mask = _box_mask(top, left, bh, bw, h, w) & _per_example(on, images)
  if value == "random":
    noise = jax.random.normal(jax.random.fold_in(key, 1), images.shape, jnp.float32)
    return jnp.where(mask, noise, images.astype(jnp.float32))
  return jnp.where(mask, jnp.asarray(value, images.dtype), images)


def cutout(key: Array, images: Array, *, size: int, probability: float = 1.0, value: float = 0.0) -> Array:
  """Cutout (DeVries & Taylor 2017): a ``size`` x ``size`` square at a uniform random centre
  (clipped at the borders) set to ``value``, with ``probability`` per image."""
  _check_batch(images, "cutout")
  b, h, w, _ = images.shape
  u = jax.random.uniform(key, (b, 3))
  cy = jnp.floor(u[:, 0] * h).astype(jnp.int32)
  cx = jnp.floor(u[:, 1] * w).astype(jnp.int32)
  top, left = cy - size // 2, cx - size // 2
  on = u[:, 2] < probability
  mask = _box_mask(top, left, size, size, h, w) & _per_example(on, images)
  return jnp.where(mask, jnp.asarray(value, images.dtype), images)


# ----------------------------------------------------------------------------- label mixing


def _check_mix(images, labels, alpha, name):
  _check_batch(images, name)
  if labels.ndim != 2 or labels.shape[0] != images.shape[0]:
    raise ValueError(f"{name} expects one-hot/soft labels [B, num_classes]; got shape {labels.shape}")
  if alpha <= 0:
    raise ValueError(f"{name} alpha must be > 0; got {alpha}")


def _beta(key: Array, alpha: float) -> Array:
  """One draw from Beta(alpha, alpha).

  For alpha <= 2, Jöhnk's rejection sampler in log space with 64 candidates drawn at once
  (acceptance >= 1/6 each, so all fail with probability < 1e-5; then 0.5 is used): a few
  uniforms, much cheaper to compile than ``jax.random.beta``'s gamma loops, which larger
  alphas use.
  """
  if alpha > 2:
    return jax.random.beta(key, alpha, alpha)
  log_u = jnp.log(jax.random.uniform(key, (2, 64), minval=jnp.finfo(jnp.float32).tiny)) / alpha
  log_sum = jnp.logaddexp(log_u[0], log_u[1])
  ok = log_sum <= 0
  first = jnp.argmax(ok)
  return jnp.where(ok[first], jnp.exp(log_u[0, first] - log_sum[first]), 0.5)


def mixup(key: Array, images: Array, labels: Array, *, alpha: float = 0.2) -> tuple[Array, Array]:
  """mixup (Zhang et al. 2018): one ``lam ~ Beta(alpha, alpha)`` per batch; each example is
  mixed with its partner in the reversed batch (as timm does; the loader already shuffles),
  labels with the same weight (rows still sum to one)."""
  _check_mix(images, labels, alpha, "mixup")
  lam = _beta(key, alpha)
  x = images.astype(jnp.float32)
  return lam * x + (1 - lam) * x[::-1], lam * labels + (1 - lam) * labels[::-1]


def cutmix(key: Array, images: Array, labels: Array, *, alpha: float = 1.0) -> tuple[Array, Array]:
  """CutMix (Yun et al. 2019): a box of area ``1 - lam`` (``lam ~ Beta(alpha, alpha)``, box
  centre uniform, clipped at the borders) is pasted from the partner in the reversed batch;
  labels are mixed by the box's actual area."""
  _check_mix(images, labels, alpha, "cutmix")
  b, h, w, _ = images.shape
  k_lam, k_pos = jax.random.split(key)
  lam = _beta(k_lam, alpha)
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = jnp.floor(h * cut), jnp.floor(w * cut)
  u = jax.random.uniform(k_pos, (2,))
  cy, cx = jnp.floor(u[0] * h), jnp.floor(u[1] * w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch - ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw - cw // 2, 0, w)
  ones = jnp.ones((b,))
  mask = _box_mask(y0 * ones, x0 * ones, (y1 - y0) * ones, (x1 - x0) * ones, h, w)
  lam_area = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  x = images.astype(jnp.float32)
  return jnp.where(mask, x[::-1], x), lam_area * labels + (1 - lam_area) * labels[::-1]


def label_smoothing(labels: Array, *, epsilon: float = 0.1) -> Array:
  """``(1 - epsilon) * labels + epsilon / num_classes``."""
  if not 0 <= epsilon < 1:
    raise ValueError(f"epsilon must be in [0, 1); got {epsilon}")
  return (1 - epsilon) * labels + epsilon / labels.shape[-1]


# ----------------------------------------------------------------------------- test-time


def tta_flip(apply_fn: Callable[[Array], Array], images: Array) -> Array:
  """Mean of ``apply_fn`` over the images and their left-right mirror images."""
  return 0.5 * (apply_fn(images) + apply_fn(images[:, :, ::-1]))


def tta_translate(apply_fn: Callable[[Array], Array], images: Array, *, pixels: int = 1,
                  flip: bool = False) -> Array:
  """airbench's "mirror + translate" TTA: ``0.5 * f(x) + 0.25 * (f(x shifted by (-p, -p)) +
  f(x shifted by (+p, +p)))``, shifts with reflect padding, each view flip-averaged if ``flip``."""
  _check_batch(images, "tta_translate")
  if pixels < 1:
    raise ValueError(f"pixels must be >= 1, got {pixels}")
  view = (lambda x: tta_flip(apply_fn, x)) if flip else apply_fn
  h, w = images.shape[1:3]
  p = pixels
  padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
  shifted = [padded[:, :h, :w], padded[:, 2 * p:2 * p + h, 2 * p:2 * p + w]]
  return 0.5 * view(images) + 0.25 * (view(shifted[0]) + view(shifted[1]))


def tta_multicrop(apply_fn: Callable[[Array], Array], images: Array, *, size: int, flip: bool = False) -> Array:
  """Mean of ``apply_fn`` over the 5 crops (4 corners + centre) of ``size`` (10 with ``flip``)."""
  _check_batch(images, "tta_multicrop")
  h, w = images.shape[1:3]
  if size > min(h, w):
    raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
  corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), ((h - size) // 2, (w - size) // 2)]
  outs = []
  for t, l in corners:
    crop = images[:, t:t + size, l:l + size]
    outs.append(tta_flip(apply_fn, crop) if flip else apply_fn(crop))
  return sum(outs) / len(outs)


# ----------------------------------------------------------------------------- composer

# name -> (function, kind): "key" = fn(key, images), "mix" = fn(key, images, labels),
# "plain" = fn(images), "label" = fn(labels).
OPS: dict[str, tuple[Callable, str]] = {
  "flip": (random_flip, "key"),
  "random_flip": (random_flip, "key"),
  "pad_crop": (pad_and_crop, "key"),
  "pad_and_crop": (pad_and_crop, "key"),
  "random_resized_crop": (random_resized_crop, "key"),
  "color_jitter": (color_jitter, "key"),
  "random_erasing": (random_erasing, "key"),
  "cutout": (cutout, "key"),
  "affine": (affine.random_affine, "key"),  # Keras ImageDataGenerator-style, jcv.data.affine
  "rotate": (affine.random_rotation, "key"),
  "shift": (affine.random_shift, "key"),
  "zoom": (affine.random_zoom, "key"),
  "shear": (affine.random_shear, "key"),
  "mixup": (mixup, "mix"),
  "cutmix": (cutmix, "mix"),
  "normalize": (normalize, "plain"),
  "scale_to_range": (scale_to_range, "plain"),
  "label_smoothing": (label_smoothing, "label"),
}
OPS.update({fn.__name__: (fn, "key") for fn in (affine.random_affine, affine.random_rotation, affine.random_shift,
                                               affine.random_zoom, affine.random_shear)})


def _parse_op(op) -> tuple[str, dict[str, Any]]:
  if isinstance(op, str):
    name, kwargs = op, {}
  elif isinstance(op, (tuple, list)) and len(op) == 2 and isinstance(op[0], str) and isinstance(op[1], dict):
    name, kwargs = op[0], dict(op[1])
  else:
    raise ValueError(f"augment op must be a name or a (name, kwargs) pair; got {op!r}")
  if name not in OPS:
    raise ValueError(f"unknown augment op {name!r}; expected one of {sorted(OPS)}")
  fn, kind = OPS[name]
  positional = {"key": ("key", "images"), "mix": ("key", "images", "labels"), "plain": ("images",),
                "label": ("labels",)}[kind]
  try:
    inspect.signature(fn).bind(*positional, **kwargs)
  except TypeError as e:
    raise ValueError(f"bad options for augment op {name!r}: {e}") from None
  if fn.__module__ == affine.__name__:  # value ranges checked now rather than in the first step
    jax.eval_shape(lambda k, x: fn(k, x, **kwargs), jax.random.key(0), jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))
  if name == "normalize":
    if max(abs(float(m)) for m in kwargs["mean"]) > 1 or max(float(s) for s in kwargs["std"]) > 1:
      raise ValueError("normalize mean/std must be in [0, 1] units here (images are uint8/255); divide by 255")
  return name, kwargs


def make_augment(ops: Sequence[Any], *, num_classes: int, dtype: Any = jnp.float32):
  """Composes ops into ``fn(key, images_uint8, labels_int) -> (images, soft_labels)``.

  ``ops`` are names or ``(name, kwargs)`` pairs from :data:`OPS`, applied in order after
  the uint8 -> float conversion to [0, 1], e.g. ``["flip", ("pad_crop", {"padding": 4}),
  ("normalize", {"mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)})]``. Labels become
  one-hot [B, num_classes] (float32) first. An empty list only converts. The result is pure
  and jit-able; each op gets its own key folded from ``key``.
  """
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1; got {num_classes}")
  parsed = [_parse_op(op) for op in ops]

  def augment(key: Array, images: Array, labels: Array) -> tuple[Array, Array]:
    _check_batch(images, "augment")
    x = images.astype(jnp.float32) / 255.0 if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) if labels.ndim == 1 else labels.astype(jnp.float32)
    for i, (name, kwargs) in enumerate(parsed):
      fn, kind = OPS[name]
      k = jax.random.fold_in(key, i)
      if kind == "key":
        x = fn(k, x, **kwargs)
      elif kind == "mix":
        x, y = fn(k, x, y, **kwargs)
      elif kind == "plain":
        x = fn(x, **kwargs)
      else:
        y = fn(y, **kwargs)
    return x.astype(dtype), y

  augment.mixes_examples = any(OPS[name][1] == "mix" for name, _ in parsed)  # mixup, cutmix
  return augment
