"""Keras-style random affine augmentation against OpenCV and scipy.ndimage, under jit and vmap."""
import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from jcv.data import affine, augment, decode
from jcv.train import invariance

H, W = 48, 64  # not square: a row/column mix-up shows
KW = dict(rotation=30, width_shift=0.1, height_shift=0.2, zoom=(0.8, 1.25), shear=15)
# Bilinear in float32 against float64 references: the differences are rounding only.
ATOL = 2e-5
# OpenCV's names for the fill modes ("constant" is left out: OpenCV interpolates towards the
# fill value across the border, scipy and dm-pix do not).
CV_BORDERS = {"nearest": cv2.BORDER_REPLICATE, "reflect": cv2.BORDER_REFLECT, "wrap": cv2.BORDER_WRAP}
SCIPY_MODES = {"nearest": "nearest", "constant": "constant", "reflect": "reflect", "wrap": "grid-wrap"}


@pytest.fixture(scope="module")
def photos(shared_dir):
  """Four real cats_vs_dogs photos, float32 [4, 48, 64, 3] in [0, 1]."""
  root = shared_dir / "data" / "cats_vs_dogs" / "train"
  files = [root / "cat" / "cat.1.jpg", root / "cat" / "cat.2.jpg", root / "dog" / "dog.1.jpg", root / "dog" / "dog.2.jpg"]
  return np.stack([cv2.resize(decode.decode_image(f), (W, H), interpolation=cv2.INTER_AREA) for f in files]) / np.float32(255)


def _params(key, batch, **kw):
  return {k: np.asarray(v, np.float64) for k, v in affine.sample_affine(key, batch, **kw).items()}


def _forward_xy(p, i):
  """The forward map of example ``i`` as OpenCV's 2x3 (x, y) matrix, built independently:
  rotation and zoom from ``cv2.getRotationMatrix2D``, then shear and shift."""
  c = np.array([(W - 1) / 2, (H - 1) / 2])
  rot = cv2.getRotationMatrix2D((float(c[0]), float(c[1])), float(p["angle"][i]), 1.0)[:, :2]
  shear = np.array([[1.0, np.tan(np.deg2rad(p["shear"][i]))], [0.0, 1.0]])
  linear = rot @ shear * p["zoom"][i]
  shift = np.array([p["shift_x"][i] * W, p["shift_y"][i] * H])
  return np.concatenate([linear, (c + shift - linear @ c)[:, None]], axis=1)


def _scipy_warp(image, forward_xy, mode, cval=0.0):
  """scipy.ndimage.affine_transform with the inverse of ``forward_xy`` in (row, col) order."""
  pull = np.linalg.inv(np.vstack([forward_xy, [0, 0, 1]]))[:2]
  swap = np.array([[0, 1], [1, 0]])
  matrix, offset = swap @ pull[:, :2] @ swap, swap @ pull[:, 2]
  return np.stack([ndimage.affine_transform(image[..., k].astype(np.float64), matrix, offset, order=1,
                                            mode=SCIPY_MODES[mode], cval=cval) for k in range(image.shape[-1])], -1)


@pytest.mark.parametrize("mode", ["nearest", "constant", "reflect", "wrap"])
def test_random_affine_matches_scipy_and_opencv(photos, mode):
  key = jax.random.key(3)
  fn = jax.jit(functools.partial(affine.random_affine, fill_mode=mode, cval=0.25, **KW))
  out = np.asarray(fn(key, jnp.asarray(photos)))
  p = _params(key, len(photos), **KW)
  for i, image in enumerate(photos):
    fwd = _forward_xy(p, i)
    np.testing.assert_allclose(out[i], _scipy_warp(image, fwd, mode, cval=0.25), atol=ATOL, err_msg=f"{mode} {i}")
    if mode in CV_BORDERS:
      ref = cv2.warpAffine(image, fwd, (W, H), flags=cv2.INTER_LINEAR, borderMode=CV_BORDERS[mode])
      np.testing.assert_allclose(out[i], ref, atol=1e-4, err_msg=f"opencv {mode} {i}")
  assert not np.allclose(out, photos, atol=0.05)  # it moved


def test_single_ops_match_scipy_rotate_and_shift(photos):
  x = jnp.asarray(photos)
  key = jax.random.key(5)
  rot = np.asarray(jax.jit(lambda k, x: affine.random_rotation(k, x, degrees=40))(key, x))
  angles = _params(key, len(photos), rotation=40)["angle"]
  for o, image, a in zip(rot, photos, angles):  # scipy: counter-clockwise on screen for angle > 0
    np.testing.assert_allclose(o, ndimage.rotate(image.astype(np.float64), a, reshape=False, order=1, mode="nearest"),
                               atol=ATOL)
  shift = np.asarray(jax.jit(lambda k, x: affine.random_shift(k, x, width=0.3, height=0.1))(key, x))
  p = _params(key, len(photos), width_shift=0.3, height_shift=0.1)
  for i, (o, image) in enumerate(zip(shift, photos)):
    ref = ndimage.shift(image.astype(np.float64), (p["shift_y"][i] * H, p["shift_x"][i] * W, 0), order=1, mode="nearest")
    np.testing.assert_allclose(o, ref, atol=ATOL)
  zoom = np.asarray(affine.random_zoom(key, x, scale=0.3, fill_mode="constant"))
  shear = np.asarray(affine.random_shear(key, x, degrees=(-20, 5), fill_mode="constant"))
  for out, kw in ((zoom, dict(zoom=0.3)), (shear, dict(shear=(-20, 5)))):
    p = _params(key, len(photos), **kw)
    for i, (o, image) in enumerate(zip(out, photos)):
      np.testing.assert_allclose(o, _scipy_warp(image, _forward_xy(p, i), "constant"), atol=ATOL)


def _recover(out):
  """Per-image forward parameters fitted to warped coordinate ramps (pixels inside only)."""
  rows, cols = np.mgrid[:H, :W]
  found = {k: [] for k in ("angle", "shear", "zoom", "shift_x", "shift_y")}
  c = np.array([(H - 1) / 2, (W - 1) / 2])
  for o in out:
    inside = (o[..., 0] >= 0) & (o[..., 1] >= 0)
    design = np.stack([rows[inside], cols[inside], np.ones(inside.sum())], 1)
    pull, *_ = np.linalg.lstsq(design, o[inside][:, :2], rcond=None)  # [3, 2]: input (row, col)
    a, off = pull[:2].T, pull[2]
    fwd = np.linalg.inv(a)  # = zoom * R @ Shear in (row, col); its column axis is zoom * R's
    zoom = np.hypot(fwd[0, 1], fwd[1, 1])
    angle = np.arctan2(-fwd[0, 1], fwd[1, 1])
    unrot = np.array([[np.cos(angle), np.sin(angle)], [-np.sin(angle), np.cos(angle)]])
    shear = (unrot @ fwd / zoom)[1, 0]
    shift = -fwd @ off - c + fwd @ c
    for k, v in zip(found, (np.rad2deg(angle), np.rad2deg(np.arctan(shear)), zoom, shift[1] / W, shift[0] / H)):
      found[k].append(v)
  return {k: np.array(v) for k, v in found.items()}


def test_parameters_fall_in_the_asked_ranges():
  # Channel 0 holds each pixel's row, channel 1 its column: bilinear warping keeps them linear,
  # so every output gives back its forward map, which must lie in the asked ranges.
  n = 64
  ramps = np.stack([*np.mgrid[:H, :W], np.zeros((H, W))], -1).astype(np.float32)
  asked = dict(rotation=(-10, 30), width_shift=0.1, height_shift=0.25, zoom=(0.8, 1.3), shear=20)
  bounds = {"angle": (-10, 30), "shift_x": (-0.1, 0.1), "shift_y": (-0.25, 0.25), "zoom": (0.8, 1.3), "shear": (-20, 20)}
  key = jax.random.key(7)
  out = np.asarray(jax.jit(functools.partial(affine.random_affine, fill_mode="constant", cval=-1.0, **asked))(
    key, jnp.asarray(np.broadcast_to(ramps, (n, H, W, 3)))))
  found = _recover(out)
  drawn = _params(key, n, **asked)
  for name, (lo, hi) in bounds.items():
    np.testing.assert_allclose(found[name], drawn[name], atol=1e-3, err_msg=name)
    assert lo <= drawn[name].min() and drawn[name].max() <= hi, name
    assert drawn[name].min() < lo + 0.2 * (hi - lo) and drawn[name].max() > hi - 0.2 * (hi - lo), name  # spread
  assert len({tuple(np.round(v, 3)) for v in zip(*drawn.values())}) == n  # each image draws its own
  still = _params(key, 8)
  assert (still["angle"] == 0).all() and (still["shift_x"] == 0).all() and (still["zoom"] == 1).all()


def test_jit_vmap_and_make_augment_agree(photos):
  x = jnp.asarray(photos)
  key = jax.random.key(11)
  fn = functools.partial(affine.random_affine, **KW)
  eager = np.asarray(fn(key, x))
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(key, x)), eager, atol=1e-5)
  keys = jax.random.split(key, len(photos))
  per = np.asarray(jax.jit(jax.vmap(lambda k, im: fn(k, im[None])[0]))(keys, x))
  for i in range(len(photos)):
    np.testing.assert_allclose(per[i], np.asarray(fn(keys[i], x[i:i + 1]))[0], atol=1e-5)
  # In the train step: each example's key is fold_in(key, global index), via the op table.
  aug = augment.make_augment([("affine", KW), ("rotate", {"degrees": 5})], num_classes=2)
  u8 = jnp.asarray(np.round(photos * 255).astype(np.uint8))
  labels = jnp.array([0, 0, 1, 1])
  step = jax.jit(lambda k: invariance.augment_per_example(k, u8, labels, jnp.arange(4), augment_fn=aug))
  images, soft = step(key)
  assert images.shape == photos.shape and images.dtype == jnp.float32 and soft.shape == (4, 2)
  k2 = jax.random.fold_in(key, 2)
  want = affine.random_rotation(jax.random.fold_in(k2, 1),
                                fn(jax.random.fold_in(k2, 0), u8[2:3].astype(jnp.float32) / 255), degrees=5)
  np.testing.assert_allclose(np.asarray(images[2]), np.asarray(want[0]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(step(key)[0]), np.asarray(images))  # a function of the key


def test_bad_options_are_clear():
  x = jnp.zeros((2, 8, 8, 3))
  for kw, match in ((dict(zoom=1.5), "zoom"), (dict(shear=95), "shear"), (dict(width_shift=1.2), "width_shift"),
                    (dict(rotation=(10, -10)), "rotation"), (dict(fill_mode="mirror"), "fill_mode")):
    with pytest.raises(ValueError, match=match):
      affine.random_affine(jax.random.key(0), x, **kw)
  with pytest.raises(ValueError, match="bad options for augment op 'shift'"):
    augment.make_augment([("shift", {"fraction": 0.1})], num_classes=2)
  with pytest.raises(ValueError, match="zoom must be"):  # when the list is made, not at the first step
    augment.make_augment(["flip", ("zoom", {"scale": (1.2, 0.9)})], num_classes=2)
  for name in ("affine", "rotate", "shift", "zoom", "shear", "random_affine", "random_rotation"):
    assert name in augment.OPS
