"""jcv.ops geometry against OpenCV, PIL and scikit-image."""
import cv2
import jax
import numpy as np
from PIL import Image
from skimage import transform

from jcv import ops


def test_resize_up_matches_opencv_linear(photo):
  got = ops.resize(photo, height=108, width=150)
  want = cv2.resize(photo, (150, 108), interpolation=cv2.INTER_LINEAR)
  np.testing.assert_allclose(got, want, atol=1e-3)  # OpenCV uses 11-bit fixed-point weights


def test_resize_down_antialiased_matches_pil(photo):
  got = np.asarray(ops.resize(photo, height=24, width=40, method="linear", antialias=True))
  want = np.stack([np.asarray(Image.fromarray(photo[..., c], mode="F").resize((40, 24), Image.BILINEAR))
                   for c in range(3)], -1)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_resize_matches_jax_image_resize(batch):
  # Same weights as jax.image.resize, applied as taps instead of a dense contraction.
  for height, width, method in [(24, 40, "linear"), (108, 150, "linear"), (24, 40, "cubic")]:
    got = ops.resize(batch, height=height, width=width, method=method)
    want = jax.image.resize(batch, (3, height, width, 3), method=method)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=method)


def test_crops_and_flips(batch):
  np.testing.assert_array_equal(ops.crop(batch, top=3, left=5, height=20, width=30), batch[:, 3:23, 5:35])
  np.testing.assert_array_equal(ops.center_crop(batch, height=32, width=32), batch[:, 20:52, 32:64])
  np.testing.assert_array_equal(ops.flip_left_right(batch), np.stack([cv2.flip(x, 1) for x in batch]))
  np.testing.assert_array_equal(ops.flip_up_down(batch), np.stack([cv2.flip(x, 0) for x in batch]))
  np.testing.assert_array_equal(ops.rot90(batch[0], k=1), cv2.rotate(batch[0], cv2.ROTATE_90_COUNTERCLOCKWISE))
  jitted = jax.jit(lambda x, t: ops.crop(x, top=t, left=t, height=8, width=8))(batch, 4)
  np.testing.assert_array_equal(jitted, batch[:, 4:12, 4:12])


def test_rotate_matches_skimage(batch):
  got = np.asarray(jax.jit(lambda x: ops.rotate(x, angle=np.deg2rad(30.0)))(batch))
  want = np.stack([transform.rotate(x, 30.0, order=1, mode="edge") for x in batch])  # CCW, degrees
  np.testing.assert_allclose(got, want, atol=1e-5)
  small = batch[0, :12, :16]  # unbatched [H, W, C] path
  np.testing.assert_allclose(ops.rotate(small, angle=np.deg2rad(-50.0)),
                             transform.rotate(small, -50.0, order=1, mode="edge"), atol=1e-5)


def test_affine_transform_matches_scipy(batch):
  from scipy import ndimage
  rng = np.random.default_rng(1)
  matrices = np.concatenate([np.eye(2) + rng.normal(0, 0.2, (3, 2, 2)), rng.normal(0, 6, (3, 2, 1))], -1)
  for mode, scipy_mode in (("nearest", "nearest"), ("constant", "constant"), ("reflect", "reflect"),
                           ("wrap", "grid-wrap")):
    for order in (0, 1):
      got = np.asarray(jax.jit(lambda x, m: ops.affine_transform(x, matrix=m, order=order, mode=mode, cval=0.3))(
          batch, matrices))  # one matrix per image
      for g, x, m in zip(got, batch, matrices):
        want = np.stack([ndimage.affine_transform(x[..., c].astype(np.float64), m[:, :2], m[:, 2], order=order,
                                                  mode=scipy_mode, cval=0.3) for c in range(3)], -1)
        if order == 1:
          np.testing.assert_allclose(g, want, atol=1e-5, err_msg=mode)
        else:  # nearest neighbour: scipy rounds samples within half a pixel outside the image in
          pos = np.einsum("ij,hwj->hwi", m[:, :2], np.stack(np.mgrid[:72, :96], -1)) + m[:, 2]
          inside = ((pos >= 0.5) & (pos <= np.array([71, 95]) - 0.5)).all(-1)
          assert np.isclose(g, want, atol=1e-5)[inside].mean() > 0.999, mode  # ties may round apart
  shared = ops.affine_transform(batch, matrix=matrices[0])  # one matrix for all, leading dims kept
  np.testing.assert_allclose(shared[2], ops.affine_transform(batch[2], matrix=matrices[0]), atol=1e-6)
