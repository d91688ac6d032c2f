"""cifar_cnn against airbench94's published numbers, a PyTorch transcription, and real images.

References: airbench94 (Jordan 2024) lists 1,972,792 parameters (PyTorch count, which holds
the 1,152 BatchNorm weights that airbench freezes at 1 and this port leaves out) and its
conv/dense MACs follow from the architecture; the whitening filters are checked to
decorrelate 2x2 patches of real CIFAR-10 JPEGs (patches cut by scikit-image).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import jcv.models as M
from jcv.models import cifar

AIRBENCH94_TORCH_PARAMS = 1_972_792
AIRBENCH94_BN_WEIGHTS = 2 * (64 + 256 + 256)
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2470, 0.2435, 0.2616], np.float32)


def _nominal_macs(widths, k=2):
  """Conv/dense MACs of airbench's net (kernel size x output positions), by hand."""
  c0 = 2 * 3 * k * k
  macs = 31 * 31 * k * k * 3 * c0  # whitening conv, VALID: 32 - 2 + 1 = 31
  cin, size = c0, 31
  for w in widths:
    macs += size * size * 9 * cin * w  # conv1 at the block's input size
    size //= 2                          # maxpool 2 (floor): 31 -> 15 -> 7 -> 3
    macs += size * size * 9 * w * w     # conv2 after the pool
    cin = w
  return macs + widths[-1] * 10


@pytest.fixture(scope="module")
def cifar_images(shared_dir):
  """200 real CIFAR-10 training JPEGs (20 per class), uint8 NHWC."""
  root = shared_dir / "data" / "cifar10" / "train"
  files = [f for c in sorted(root.iterdir()) for f in sorted(c.iterdir())[:20]]
  return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def _normalise(images):
  return (images.astype(np.float32) / 255.0 - MEAN) / STD


def test_param_count_matches_airbench94():
  assert M.get_card("cifar_cnn").reference_params == AIRBENCH94_TORCH_PARAMS - AIRBENCH94_BN_WEIGHTS
  assert M.count_params("cifar_cnn") == AIRBENCH94_TORCH_PARAMS - AIRBENCH94_BN_WEIGHTS
  assert M.count_params("cifar_cnn", collection="batch_stats") == 2 * AIRBENCH94_BN_WEIGHTS


@pytest.mark.parametrize("width,widths", [(1.0, (64, 256, 256)), (0.5, (32, 128, 128))])
def test_macs_match_the_architecture(width, widths):
  got = M.measure_macs("cifar_cnn", width=width)
  assert got["nominal_macs"] == _nominal_macs(widths)
  if width == 1.0:
    assert got["nominal_macs"] == 118_147_360  # 0.236 GFLOP forward; x3 x 500k images = 0.35 PFLOP
  assert 0.8 * got["nominal_macs"] < got["macs"] <= got["nominal_macs"]  # XLA skips padding taps


def test_shapes_features_and_options():
  def out_shape(**options):
    model = M.create("cifar_cnn", **options)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return jax.eval_shape(lambda v, x: model.apply(v, x), v, x).shape
  assert out_shape() == (2, 10)
  assert out_shape(num_classes=0) == (2, 256)
  assert out_shape(num_classes=0, width=0.5) == (2, 128)
  assert out_shape(num_classes=100, widths=(16, 32, 48)) == (2, 100)
  with pytest.raises(ValueError, match="3 entries"):
    M.create("cifar_cnn", widths=(16, 32))
  with pytest.raises(ValueError, match="width must be > 0"):
    M.create("cifar_cnn", width=0)


def test_dirac_init_is_identity_in_the_first_filters():
  k = cifar.dirac_init(jax.random.key(0), (3, 3, 8, 12))
  x = np.random.default_rng(0).normal(size=(2, 6, 6, 8)).astype(np.float32)
  y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(y[..., :8]), x, rtol=0, atol=1e-6)
  bound = 1 / np.sqrt(9 * 8)  # PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  assert np.abs(np.asarray(k[..., 8:])).max() <= bound and np.asarray(k[..., 8:]).std() > bound / 3


def test_whitening_decorrelates_real_patches(cifar_images):
  from skimage.util import view_as_windows
  x = _normalise(cifar_images)
  eps = 5e-4
  kernel = cifar.whitening_kernel(x, kernel_size=2, eps=eps)
  assert kernel.shape == (2, 2, 3, 24)
  np.testing.assert_array_equal(kernel[..., 12:], -kernel[..., :12])
  # Independent patch extraction (scikit-image), flattened in HWC order like the HWIO kernel.
  patches = view_as_windows(x, (1, 2, 2, 3)).reshape(-1, 12).astype(np.float64)
  eigenvalues = np.sort(np.linalg.eigvalsh(patches.T @ patches / len(patches)))[::-1]
  # The model's own whitening conv (XLA) on the same images.
  model = M.create("cifar_cnn", whiten_init=cifar.whitening_init(x))
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1]))["params"]
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  params = cifar.set_whitening(params, x)
  y = jax.lax.conv_general_dilated(x, params["whiten"]["kernel"], (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  y = np.asarray(y, np.float64).reshape(-1, 24)[:, :12]
  cov = y.T @ y / len(y)
  np.testing.assert_allclose(cov, np.diag(eigenvalues / (eigenvalues + eps)), atol=2e-4)
  # Unit variance where the eigenvalue dominates eps; JPEG (quality ~75) leaves the highest
  # 2x2 frequencies with eigenvalues near eps, which eps damps, as intended.
  assert np.diag(cov)[:6].min() > 0.99 and np.diag(cov).max() < 1


def test_whitening_init_from_source_matches_kernel(cifar_images):
  from jcv.data.sources import ArraySource
  labels = np.repeat(np.arange(10), 20)
  src = ArraySource(cifar_images, labels)
  init = cifar.whitening_init_from_source(src, mean=MEAN, std=STD, num_images=100)
  want = cifar.whitening_kernel(_normalise(cifar_images[:100]))
  np.testing.assert_allclose(np.asarray(init(None, (2, 2, 3, 24))), want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="does not match"):
    init(None, (3, 3, 3, 54))
  model = M.create("cifar_cnn", whiten_init=init, width=0.25)
  v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  np.testing.assert_allclose(np.asarray(v["params"]["whiten"]["kernel"]), want, rtol=1e-6, atol=1e-6)


def test_param_labels():
  model = M.create("cifar_cnn", width=0.25)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  labels = cifar.param_labels(params)
  assert labels["whiten"] == {"kernel": "frozen", "bias": "whiten_bias"}
  assert labels["block2"]["bn1"]["bias"] == "bn_bias"
  assert labels["block2"]["conv1"]["kernel"] == "default" and labels["head"]["kernel"] == "default"


def _torch_airbench(widths, num_classes=10):
  """A PyTorch transcription of airbench94's network (eval/train semantics as in its code)."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class Group(nn.Module):
    def __init__(self, cin, cout):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, padding="same", bias=False)
      self.norm1 = nn.BatchNorm2d(cout, eps=1e-12, momentum=0.4, affine=True)
      self.conv2 = nn.Conv2d(cout, cout, 3, padding="same", bias=False)
      self.norm2 = nn.BatchNorm2d(cout, eps=1e-12, momentum=0.4, affine=True)

    def forward(self, x):
      x = nn.functional.gelu(self.norm1(nn.functional.max_pool2d(self.conv1(x), 2)))
      return nn.functional.gelu(self.norm2(self.conv2(x)))

  layers = [nn.Conv2d(3, 24, 2, padding=0, bias=True), nn.GELU()]
  cin = 24
  for w in widths:
    layers.append(Group(cin, w))
    cin = w
  layers += [nn.MaxPool2d(3), nn.Flatten(), nn.Linear(cin, num_classes, bias=False)]
  return torch, nn.Sequential(*layers)


def test_matches_pytorch_airbench_forward_and_bn_update(cifar_images):
  widths = (16, 32, 32)
  torch, net = _torch_airbench(widths)
  model = M.create("cifar_cnn", widths=widths)
  x = _normalise(cifar_images[:32])
  v = model.init(jax.random.key(1), x[:1])
  p = v["params"]
  rng = np.random.default_rng(0)
  p = jax.tree.map(lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), p)  # nonzero BN biases
  t = lambda a: torch.from_numpy(np.array(a, np.float32))  # a writable copy
  with torch.no_grad():
    net[0].weight.copy_(t(np.transpose(p["whiten"]["kernel"], (3, 2, 0, 1))))
    net[0].bias.copy_(t(p["whiten"]["bias"]))
    for i in range(3):
      g, q = net[2 + i], p[f"block{i + 1}"]
      g.conv1.weight.copy_(t(np.transpose(q["conv1"]["kernel"], (3, 2, 0, 1))))
      g.conv2.weight.copy_(t(np.transpose(q["conv2"]["kernel"], (3, 2, 0, 1))))
      g.norm1.bias.copy_(t(q["bn1"]["bias"]))
      g.norm2.bias.copy_(t(q["bn2"]["bias"]))
    net[-1].weight.copy_(t(np.asarray(p["head"]["kernel"]).T))
  xt = t(np.transpose(x, (0, 3, 1, 2)))
  # Train mode: batch statistics, running averages updated with momentum 0.6 (PyTorch 0.4).
  net.train()
  with torch.no_grad():
    want = net(xt).numpy() / 9
  got, new = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x, train=True,
                         mutable=["batch_stats"])
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(np.asarray(new["batch_stats"]["block2"]["bn1"]["mean"]),
                             net[3].norm1.running_mean.numpy(), rtol=1e-4, atol=1e-5)
  # Eval mode with the updated statistics (PyTorch keeps the unbiased variance: rescale ours).
  n = 32 * 7 * 7  # block2/bn1 sees 7x7 maps
  var = np.asarray(new["batch_stats"]["block2"]["bn1"]["var"])
  np.testing.assert_allclose((var - 0.6) / 0.4 * n / (n - 1), (net[3].norm1.running_var.numpy() - 0.6) / 0.4,
                             rtol=1e-3, atol=1e-4)
  net.eval()
  stats = jax.tree.map(np.asarray, new["batch_stats"])
  with torch.no_grad():
    for i in range(3):
      g, s = net[2 + i], stats[f"block{i + 1}"]
      for name in ("1", "2"):
        norm = getattr(g, "norm" + name)
        norm.running_mean.copy_(t(s["bn" + name]["mean"]))
        norm.running_var.copy_(t(s["bn" + name]["var"]))
    want = net(xt).numpy() / 9
  got = model.apply({"params": p, "batch_stats": stats}, x, train=False)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-4)
