"""On-device augmentation against numpy, PIL and scikit-image references."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import color as skcolor

from jcv.data import augment as A
from jcv.data import decode


@pytest.fixture(scope="module")
def photos(shared_dir):
  """Eight real CIFAR test images, uint8 [8, 32, 32, 3]."""
  root = shared_dir / "data" / "cifar10" / "test"
  classes = sorted(p.name for p in root.iterdir())[:8]
  return np.stack([decode.decode_image(root / c / "0003.jpg") for c in classes])


def _f(x):
  return np.asarray(x, np.float32) / 255.0


def test_random_flip_is_a_flip(photos):
  x = jnp.asarray(photos)
  np.testing.assert_array_equal(A.random_flip(jax.random.key(0), x, probability=1.0), photos[:, :, ::-1])
  np.testing.assert_array_equal(A.random_flip(jax.random.key(0), x, probability=0.0), photos)
  out = np.asarray(jax.jit(A.random_flip)(jax.random.key(1), x))
  flipped = [np.array_equal(o, p[:, ::-1]) for o, p in zip(out, photos)]
  kept = [np.array_equal(o, p) for o, p in zip(out, photos)]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)
  np.testing.assert_array_equal(out, jax.jit(A.random_flip)(jax.random.key(1), x))  # same key, same result


def test_pad_and_crop_takes_windows_of_the_padded_image(photos):
  out = np.asarray(jax.jit(lambda k, x: A.pad_and_crop(k, x, padding=4))(jax.random.key(2), jnp.asarray(photos)))
  assert out.shape == photos.shape and out.dtype == np.uint8
  padded = np.pad(photos, ((0, 0), (4, 4), (4, 4), (0, 0)))
  for o, p in zip(out, padded):
    assert any(np.array_equal(o, p[t:t + 32, l:l + 32]) for t in range(9) for l in range(9))
  np.testing.assert_array_equal(A.pad_and_crop(jax.random.key(2), jnp.asarray(photos), padding=0), photos)


def test_random_resized_crop_full_box_is_pil_bilinear(photos):
  x = jnp.asarray(_f(photos))
  for size in (16,):
    crop = jax.jit(functools.partial(A.random_resized_crop, size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    out = np.asarray(crop(jax.random.key(0), x))
    assert out.shape == (8, size, size, 3) and out.dtype == np.float32
    for o, p in zip(out, photos):
      ref = np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR), np.float32)
      assert np.abs(o * 255 - ref).max() <= 1.5  # PIL rounds to uint8 between its two passes


def test_random_resized_crop_is_deterministic_and_varies(photos):
  x = jnp.asarray(_f(photos))
  f = jax.jit(lambda k, x: A.random_resized_crop(k, x, size=24))
  a, b, c = f(jax.random.key(0), x), f(jax.random.key(0), x), f(jax.random.key(1), x)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert float(a.min()) >= -1e-6 and float(a.max()) <= 1 + 1e-6


def test_random_resized_crop_boxes_respect_scale_and_ratio():
  # Channel 0 holds the x coordinate, channel 1 the y coordinate: linear resampling keeps them
  # linear, so each output's value range gives its crop box.
  n, size, out = 64, 64, 16
  ramp = (np.arange(size, dtype=np.float32) + 0.5) / size
  grid = np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.zeros((size, size))], -1)
  x = jnp.asarray(np.broadcast_to(grid, (n, size, size, 3)), jnp.float32)
  crop = jax.jit(functools.partial(A.random_resized_crop, size=out, scale=(0.2, 0.6), ratio=(0.5, 2.0)))
  res = np.asarray(crop(jax.random.key(3), x))
  w = np.ptp(res[..., 0], axis=(1, 2)) * out / (out - 1)  # box width as a fraction of the image
  h = np.ptp(res[..., 1], axis=(1, 2)) * out / (out - 1)
  assert ((w * h > 0.2 - 0.03) & (w * h < 0.6 + 0.03)).all()
  assert ((w / h > 0.5 - 0.06) & (w / h < 2.0 + 0.06)).all()
  assert (res[..., :2].min(axis=(1, 2)) >= 0).all() and (res[..., :2].max(axis=(1, 2)) <= 1).all()
  assert np.ptp(res[..., 0].min(axis=(1, 2))) > 0.2  # positions vary


def test_brightness_scales_each_image(photos):
  x = _f(photos)
  out = np.asarray(jax.jit(functools.partial(A.color_jitter, brightness=0.4))(jax.random.key(3), jnp.asarray(x)))
  for o, i in zip(out, x):
    ok = (i > 0.05) & (o < 0.999)  # not clipped
    ratio = o[ok] / i[ok]
    assert np.ptp(ratio) < 1e-4 and 0.6 - 1e-5 <= ratio.mean() <= 1.4 + 1e-5


def test_saturation_and_contrast_blend_with_grey(photos):
  x = _f(photos)
  grey = x @ np.array([0.2989, 0.587, 0.114], np.float32)
  for kw, target in (({"saturation": 0.5}, grey[..., None]),
                     ({"contrast": 0.5}, grey.mean(axis=(1, 2))[:, None, None, None] * np.ones_like(x))):
    out = np.asarray(jax.jit(functools.partial(A.color_jitter, **kw))(jax.random.key(4), jnp.asarray(x)))
    for o, i, t in zip(out, x, target):
      ok = (o > 1e-3) & (o < 0.999)
      d = (i - t) * np.ones_like(i)
      f = (((o - t) * d)[ok]).sum() / ((d * d)[ok]).sum()  # least-squares blend factor
      assert 0.5 - 1e-4 <= f <= 1.5 + 1e-4, kw
      np.testing.assert_allclose(o[ok], (f * i + (1 - f) * t)[ok], atol=2e-5, err_msg=str(kw))


def test_hue_shift_keeps_saturation_and_value_like_skimage(photos):
  x = _f(photos)
  out = np.asarray(jax.jit(functools.partial(A.color_jitter, hue=0.1))(jax.random.key(5), jnp.asarray(x)))
  for o, i in zip(out, x):
    hi, ho = skcolor.rgb2hsv(i), skcolor.rgb2hsv(o)
    np.testing.assert_allclose(ho[..., 2], hi[..., 2], atol=1e-5)
    colourful = hi[..., 1] > 0.2
    np.testing.assert_allclose(ho[..., 1][colourful], hi[..., 1][colourful], atol=1e-4)
    shift = (ho[..., 0] - hi[..., 0] + 0.5) % 1.0 - 0.5
    assert np.ptp(shift[colourful]) < 1e-3 and abs(shift[colourful].mean()) <= 0.1 + 1e-4
  np.testing.assert_array_equal(A.color_jitter(jax.random.key(5), jnp.asarray(x)), x)


def test_random_erasing_sets_one_box(photos):
  x = _f(photos)
  erase = jax.jit(functools.partial(A.random_erasing, probability=1.0, value=0.5))
  out = np.asarray(erase(jax.random.key(6), jnp.asarray(x)))
  for o, i in zip(out, x):
    changed = np.any(o != i, axis=-1) | np.all(o == 0.5, axis=-1)
    ys, xs = np.nonzero(changed)
    box = np.zeros_like(changed)
    box[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
    assert (o[box] == 0.5).all() and np.array_equal(o[~box], i[~box])
    assert 0.02 - 0.01 <= box.mean() <= 1 / 3 + 0.02


def test_cutout_square_clipped_at_borders(photos):
  out = np.asarray(jax.jit(functools.partial(A.cutout, size=10))(jax.random.key(7), jnp.asarray(photos)))
  for o, i in zip(out, photos):
    zero = np.all(o == 0, axis=-1) & np.any(i != 0, axis=-1)
    ys, xs = np.nonzero(zero)
    assert ys.max() - ys.min() < 10 and xs.max() - xs.min() < 10
    assert (o == 0).all(-1).sum() >= 25  # at least a quarter square survives the clipping


def test_mixup_and_cutmix_labels_match_pixel_fractions():
  b = 8
  images = jnp.broadcast_to(jnp.arange(b, dtype=jnp.float32)[:, None, None, None], (b, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(b), b)  # one class per example: pixel values reveal the mix
  values = np.arange(b, dtype=np.float64)
  mix = jax.jit(functools.partial(A.mixup, alpha=0.4))
  cut = jax.jit(functools.partial(A.cutmix, alpha=1.0))
  for seed in range(4):
    for fn in (mix, cut):
      xi, yi = fn(jax.random.key(seed), images, labels)
      xi, yi = np.asarray(xi)[..., 0], np.asarray(yi)
      np.testing.assert_allclose(yi.sum(1), 1, atol=1e-6)
      np.testing.assert_allclose(xi.mean(axis=(1, 2)), yi @ values, atol=1e-4)  # mean pixel = label mix
      if fn is cut:  # every pixel comes from one of the two examples, in the label proportions
        for k in range(b):
          for c in np.nonzero(yi[k])[0]:
            assert np.isclose(xi[k], c).mean() == pytest.approx(yi[k, c], abs=1e-6)


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_mixing_weights_follow_the_beta_distribution(alpha):
  stats = pytest.importorskip("scipy.stats")
  draw = jax.jit(jax.vmap(lambda k: A._beta(k, alpha)))
  lam = np.asarray(draw(jax.random.split(jax.random.key(0), 4000)))
  # Kolmogorov-Smirnov against scipy's Beta(alpha, alpha); 0.031 is the 0.1 % critical value for n=4000.
  assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).statistic < 0.031


def test_normalize_scale_and_label_smoothing_match_numpy(photos):
  x = _f(photos)
  mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
  np.testing.assert_allclose(A.normalize(jnp.asarray(x), mean=mean, std=std), (x - mean) / std, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(A.scale_to_range(jnp.asarray(x)), x * 2 - 1, atol=1e-6)
  y = np.eye(4, dtype=np.float32)
  np.testing.assert_allclose(A.label_smoothing(jnp.asarray(y), epsilon=0.2), y * 0.8 + 0.05, atol=1e-7)


def test_tta_helpers_average_views(photos):
  x = jnp.asarray(_f(photos))
  ramp = jnp.linspace(0, 1, 32)[None, None, :, None]
  apply_fn = lambda im: jnp.sum(im * ramp[:, :, :im.shape[2]], axis=(1, 2, 3))
  expect = 0.5 * (np.sum(_f(photos) * np.asarray(ramp), axis=(1, 2, 3))
                  + np.sum(_f(photos)[:, :, ::-1] * np.asarray(ramp), axis=(1, 2, 3)))
  np.testing.assert_allclose(A.tta_flip(apply_fn, x), expect, rtol=1e-5)
  mean_fn = lambda im: im.mean(axis=(1, 2, 3))
  xs = _f(photos)
  crops = [xs[:, :24, :24], xs[:, :24, 8:], xs[:, 8:, :24], xs[:, 8:, 8:], xs[:, 4:28, 4:28]]
  np.testing.assert_allclose(A.tta_multicrop(mean_fn, x, size=24), np.mean([c.mean(axis=(1, 2, 3)) for c in crops], 0),
                             rtol=1e-5)


def test_tta_translate_is_airbench_level_2(photos):
  """0.5 f(x) + 0.25 f(up-left shift) + 0.25 f(down-right shift), reflect padding (np.pad), each
  view flip-averaged: a position-dependent apply_fn sees every view."""
  xs = _f(photos)
  weights = np.random.default_rng(0).normal(size=xs.shape[1:]).astype(np.float32)
  apply_fn = lambda im: jnp.sum(im * weights, axis=(1, 2, 3))
  f = lambda im: np.sum(im * weights, axis=(1, 2, 3), dtype=np.float64)
  pad = np.pad(xs, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  h, w = xs.shape[1:3]
  views = [xs, pad[:, :h, :w], pad[:, 2:, 2:]]
  plain = 0.5 * f(views[0]) + 0.25 * (f(views[1]) + f(views[2]))
  np.testing.assert_allclose(A.tta_translate(apply_fn, jnp.asarray(xs)), plain, rtol=1e-4, atol=1e-3)
  flipped = [0.5 * (f(v) + f(v[:, :, ::-1])) for v in views]
  np.testing.assert_allclose(A.tta_translate(apply_fn, jnp.asarray(xs), flip=True),
                             0.5 * flipped[0] + 0.25 * (flipped[1] + flipped[2]), rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="pixels"):
    A.tta_translate(apply_fn, jnp.asarray(xs), pixels=0)


def test_make_augment_composes_and_validates(photos):
  x, y = jnp.asarray(photos), jnp.arange(8) % 10
  plain = A.make_augment([], num_classes=10)
  xi, yi = plain(jax.random.key(0), x, y)
  np.testing.assert_allclose(xi, _f(photos), atol=1e-7)
  np.testing.assert_array_equal(yi, np.eye(10)[np.arange(8)])
  ops = ["flip", ("pad_crop", {"padding": 4}), ("random_resized_crop", {"size": 24}),
         ("color_jitter", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.1}),
         ("random_erasing", {"probability": 0.5}), ("cutout", {"size": 8}), ("mixup", {"alpha": 0.2}),
         ("cutmix", {"alpha": 1.0}), ("normalize", {"mean": [0.5] * 3, "std": [0.25] * 3}), "label_smoothing"]
  key = jax.random.key(1)
  shapes = jax.eval_shape(A.make_augment(ops, num_classes=10), key, x, y)  # traces every op, no compile
  assert shapes[0].shape == (8, 24, 24, 3) and shapes[0].dtype == jnp.float32 and shapes[1].shape == (8, 10)
  fn = jax.jit(A.make_augment(ops[:2] + ops[-2:], num_classes=10))
  a, ya = fn(key, x, y)
  b, yb = fn(key, x, y)
  c, _ = fn(jax.random.key(2), x, y)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(ya, yb)
  assert not np.allclose(a, c)
  np.testing.assert_allclose(np.asarray(ya).sum(1), 1, atol=1e-5)
  with pytest.raises(ValueError, match="unknown augment op 'blur'"):
    A.make_augment(["blur"], num_classes=10)
  with pytest.raises(ValueError, match="bad options for augment op 'pad_crop'"):
    A.make_augment([("pad_crop", {"pad": 4})], num_classes=10)
  with pytest.raises(ValueError, match="divide by 255"):
    A.make_augment([("normalize", {"mean": [123.7, 116.3, 103.5], "std": [58.4, 57.1, 57.4]})], num_classes=10)
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    A.random_flip(jax.random.key(0), x[0])
