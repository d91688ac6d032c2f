"""Shared layers against NumPy references (and PyTorch's definitions where torch is installed)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcv.models import layers

RNG = np.random.default_rng(0)


def _np_pool(x, k, s, p, ceil_mode, reduce, count_include_pad=True):
  """Direct NumPy transcription of PyTorch's pooling definition (NHWC)."""
  n, h, w, c = x.shape
  oh = layers.pool_output_size(h, k, s, p, ceil_mode=ceil_mode)
  ow = layers.pool_output_size(w, k, s, p, ceil_mode=ceil_mode)
  out = np.zeros((n, oh, ow, c), x.dtype)
  for i, j in itertools.product(range(oh), range(ow)):
    r0, c0 = i * s - p, j * s - p
    r1, c1 = min(r0 + k, h + p), min(c0 + k, w + p)  # window clipped to the padded input
    rr0, cc0, rr1, cc1 = max(r0, 0), max(c0, 0), min(r1, h), min(c1, w)
    window = x[:, rr0:rr1, cc0:cc1]
    if reduce == "max":
      out[:, i, j] = window.max(axis=(1, 2))
    else:
      count = (r1 - r0) * (c1 - c0) if count_include_pad else (rr1 - rr0) * (cc1 - cc0)
      out[:, i, j] = window.sum(axis=(1, 2)) / count
  return out


@pytest.mark.parametrize("size,k,s,p,ceil,expected", [
    (112, 3, 2, 0, True, 56), (56, 3, 2, 0, True, 28), (14, 2, 2, 0, True, 7),  # GoogLeNet
    (112, 3, 2, 1, False, 56), (13, 3, 2, 0, False, 6), (14, 3, 2, 0, True, 7),
    (14, 3, 2, 0, False, 6), (5, 2, 2, 1, True, 3),  # last window would start in the right pad
])
def test_pool_output_size_follows_pytorch(size, k, s, p, ceil, expected):
  assert layers.pool_output_size(size, k, s, p, ceil_mode=ceil) == expected


@pytest.mark.parametrize("size,k,s,p,ceil", [(9, 3, 2, 0, True), (10, 3, 2, 1, False),
                                             (7, 2, 2, 1, True), (8, 3, 1, 1, True)])
def test_max_pool_matches_numpy(size, k, s, p, ceil):
  x = RNG.normal(size=(2, size, size + 1, 3)).astype(np.float32)
  got = layers.max_pool(jnp.asarray(x), k, s, padding=p, ceil_mode=ceil)
  np.testing.assert_allclose(got, _np_pool(x, k, s, p, ceil, "max"), rtol=0, atol=0)


@pytest.mark.parametrize("size,k,p,ceil", [(31, 2, 0, False), (31, 2, 0, True), (8, 2, 0, False),
                                           (7, 3, 1, True), (9, 3, 0, False)])
def test_block_max_pool_values_and_gradient_match_reduce_window(size, k, p, ceil):
  """The CPU path (window == stride: reshape + max) against numpy and XLA's reduce_window."""
  from jcv import kernels
  x = jnp.asarray(RNG.normal(size=(2, size, size + 1, 3)).astype(np.float32))  # no ties
  with kernels.lowering("cpu"):
    got = layers.max_pool(x, k, k, padding=p, ceil_mode=ceil)
    grad = jax.grad(lambda x: jnp.sum(jnp.sin(layers.max_pool(x, k, k, padding=p, ceil_mode=ceil))))(x)
  np.testing.assert_array_equal(got, _np_pool(np.asarray(x), k, k, p, ceil, "max"))
  with kernels.lowering("xla"):
    want = jax.grad(lambda x: jnp.sum(jnp.sin(layers.max_pool(x, k, k, padding=p, ceil_mode=ceil))))(x)
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("include", [True, False])
def test_avg_pool_matches_numpy(include):
  x = RNG.normal(size=(2, 9, 8, 4)).astype(np.float32)
  got = layers.avg_pool(jnp.asarray(x), 3, 1, padding=1, count_include_pad=include)
  np.testing.assert_allclose(got, _np_pool(x, 3, 1, 1, False, "avg", include), rtol=1e-6, atol=1e-6)


def _np_adaptive(x, n, reduce):
  h, w = x.shape[1:3]
  out = np.zeros((x.shape[0], n, n, x.shape[3]), x.dtype)
  for i, j in itertools.product(range(n), range(n)):
    r0, r1 = (i * h) // n, -(-((i + 1) * h) // n)
    c0, c1 = (j * w) // n, -(-((j + 1) * w) // n)
    out[:, i, j] = reduce(x[:, r0:r1, c0:c1], axis=(1, 2))
  return out


@pytest.mark.parametrize("shape,n", [((2, 13, 13, 3), 6), ((1, 7, 7, 2), 7), ((1, 14, 14, 2), 7),
                                     ((1, 3, 5, 2), 6), ((1, 10, 10, 1), 4)])
def test_adaptive_pools_match_numpy(shape, n):
  x = RNG.normal(size=shape).astype(np.float32)
  np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), n), _np_adaptive(x, n, np.mean),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(layers.adaptive_max_pool(jnp.asarray(x), n), _np_adaptive(x, n, np.max))


@pytest.mark.parametrize("hw", [(13, 13), (4, 4), (3, 7), (21, 17)])
def test_spatial_pyramid_pool_matches_numpy(hw):
  x = RNG.normal(size=(2, *hw, 5)).astype(np.float32)
  got = layers.SpatialPyramidPool(levels=(6, 3, 2, 1)).apply({}, jnp.asarray(x))
  want = np.concatenate([_np_adaptive(x, n, np.max).reshape(2, -1) for n in (6, 3, 2, 1)], axis=1)
  assert got.shape == (2, 5 * 50)
  np.testing.assert_array_equal(got, want)


def test_local_response_norm_matches_formula():
  x = RNG.normal(size=(2, 4, 4, 11)).astype(np.float32) * 3
  got = layers.LocalResponseNorm(size=5, alpha=1e-2, beta=0.75, k=2.0).apply({}, jnp.asarray(x))
  sq = np.pad(x ** 2, ((0, 0), (0, 0), (0, 0), (2, 2)))
  window = sum(sq[..., i:i + 11] for i in range(5))
  np.testing.assert_allclose(got, x / (2.0 + 1e-2 / 5 * window) ** 0.75, rtol=1e-5, atol=1e-6)


def test_pooling_and_lrn_match_pytorch():
  torch = pytest.importorskip("torch")
  x = RNG.normal(size=(2, 11, 9, 6)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()  # noqa: E731
  for k, s, p, ceil in [(3, 2, 0, True), (3, 2, 1, False), (2, 2, 1, True), (3, 1, 1, True)]:
    want = to_nhwc(torch.nn.functional.max_pool2d(xt, k, s, p, ceil_mode=ceil))
    np.testing.assert_array_equal(layers.max_pool(jnp.asarray(x), k, s, padding=p, ceil_mode=ceil), want)
  want = to_nhwc(torch.nn.functional.avg_pool2d(xt, 3, 1, 1, count_include_pad=True))
  np.testing.assert_allclose(layers.avg_pool(jnp.asarray(x), 3, 1, padding=1), want, rtol=1e-5, atol=1e-6)
  for n in (1, 3, 6, 7):
    want = to_nhwc(torch.nn.functional.adaptive_max_pool2d(xt, n))
    np.testing.assert_array_equal(layers.adaptive_max_pool(jnp.asarray(x), n), want)
    want = to_nhwc(torch.nn.functional.adaptive_avg_pool2d(xt, n))
    np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), n), want, rtol=1e-5, atol=1e-6)
  want = to_nhwc(torch.nn.LocalResponseNorm(5, alpha=1e-2, beta=0.75, k=2.0)(xt))
  got = layers.LocalResponseNorm(alpha=1e-2).apply({}, jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_zero_pad_shortcut_is_strided_identity_with_zero_channels():
  """With the last BN scale at zero the block is relu(shortcut): option A is exactly visible."""
  x = RNG.normal(size=(2, 8, 8, 4)).astype(np.float32)
  block = layers.BasicBlock(8, strides=2, shortcut="zero_pad", zero_init_residual=True)
  variables = block.init(jax.random.key(0), jnp.asarray(x))
  got = block.apply(variables, jnp.asarray(x))
  want = np.maximum(np.pad(x[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (2, 2))), 0)
  np.testing.assert_allclose(got, want, rtol=0, atol=0)
  assert "downsample" not in variables["params"]


def test_projection_shortcut_is_strided_1x1_conv():
  x = RNG.normal(size=(2, 8, 8, 4)).astype(np.float32)
  block = layers.Bottleneck(3, strides=2, zero_init_residual=True)  # 3 x 4 = 12 outputs
  variables = block.init(jax.random.key(0), jnp.asarray(x))
  got = block.apply(variables, jnp.asarray(x))
  kernel = np.asarray(variables["params"]["downsample"]["conv"]["kernel"])[0, 0]  # (4, 12)
  eps = 1e-5  # BN at init in eval mode: (y - 0) / sqrt(1 + eps)
  want = np.maximum(np.einsum("nhwc,cd->nhwd", x[:, ::2, ::2], kernel) / np.sqrt(1 + eps), 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_inception_v1_block_concatenates_branches():
  block = layers.InceptionV1Block(64, 96, 128, 16, 32, 32)
  x = jax.ShapeDtypeStruct((1, 28, 28, 192), jnp.float32)
  out, variables = jax.eval_shape(lambda x: block.init_with_output(jax.random.key(0), x), x)
  assert out.shape == (1, 28, 28, 64 + 128 + 32 + 32)
  assert variables["params"]["branch3"]["conv_1"]["conv"]["kernel"].shape == (3, 3, 16, 32)
  wide = layers.InceptionV1Block(64, 96, 128, 16, 32, 32, wide_kernel=5)
  _, variables = jax.eval_shape(lambda x: wide.init_with_output(jax.random.key(0), x), x)
  assert variables["params"]["branch3"]["conv_1"]["conv"]["kernel"].shape == (5, 5, 16, 32)


def test_conv_branch_spec_defaults_and_padding():
  branch = layers.ConvBranch([(8, 1), (8, (1, 7)), (6, 3, 2, "VALID"), (4, 3, 1)])
  x = jax.ShapeDtypeStruct((1, 17, 17, 3), jnp.float32)
  out, variables = jax.eval_shape(lambda x: branch.init_with_output(jax.random.key(0), x), x)
  assert out.shape == (1, 8, 8, 4)
  assert variables["params"]["conv_1"]["conv"]["kernel"].shape == (1, 7, 8, 8)


def test_layer_errors():
  with pytest.raises(ValueError, match="'max' or 'avg'"):
    layers.SpatialPyramidPool(mode="min").apply({}, jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match="larger than input"):
    layers.pool_output_size(2, 3, 2)


@pytest.mark.parametrize("mode", ["fan_in", "fan_out", "fan_avg"])
@pytest.mark.parametrize("distribution", ["normal", "truncated_normal", "uniform"])
def test_flat_variance_scaling_matches_flax_distribution(mode, distribution):
  import flax.linen as nn
  shape = (3, 3, 48, 96)
  ours = np.asarray(layers.variance_scaling(2.0, mode, distribution)(jax.random.key(0), shape))
  flax = np.asarray(nn.initializers.variance_scaling(2.0, mode, distribution)(jax.random.key(1), shape))
  assert ours.shape == shape and ours.dtype == np.float32
  np.testing.assert_allclose(ours.std(), flax.std(), rtol=0.02)
  np.testing.assert_allclose(np.abs(ours).max(), np.abs(flax).max(), rtol=0.25)
  assert abs(ours.mean()) < 0.02 * ours.std()


def _torch_bn(torch, channels, rng):
  bn = torch.nn.BatchNorm2d(channels, eps=1e-5).eval()
  with torch.no_grad():
    for t in (bn.weight, bn.bias, bn.running_mean):
      t.copy_(torch.from_numpy(rng.normal(size=channels).astype(np.float32)))
    bn.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 2, size=channels).astype(np.float32)))
  return bn


def _port(conv, bn):
  """Flax variables of a ConvBNAct from a torch Conv2d + BatchNorm2d."""
  kernel = conv.weight.detach().numpy().transpose(2, 3, 1, 0)  # OIHW -> HWIO
  return ({"conv": {"kernel": kernel}, "bn": {"scale": bn.weight.detach().numpy(),
                                                "bias": bn.bias.detach().numpy()}},
          {"bn": {"mean": bn.running_mean.numpy(), "var": bn.running_var.numpy()}})


@pytest.mark.parametrize("block_name,features,strides", [("basic", 8, 2), ("basic", 4, 1),
                                                         ("bottleneck", 3, 2)])
def test_residual_blocks_match_pytorch(block_name, features, strides):
  """torchvision's BasicBlock/Bottleneck written out in torch, weights copied, eval mode."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  cin = 4
  expansion = 1 if block_name == "basic" else 4
  out = features * expansion
  if block_name == "basic":
    specs = [("conv1", cin, features, 3, strides, 1), ("conv2", features, features, 3, 1, 1)]
  else:
    specs = [("conv1", cin, features, 1, 1, 0), ("conv2", features, features, 3, strides, 1),
             ("conv3", features, out, 1, 1, 0)]
  if strides != 1 or cin != out:
    specs.append(("downsample", cin, out, 1, strides, 0))
  convs = {name: (torch.nn.Conv2d(i, o, k, s, p, bias=False), _torch_bn(torch, o, rng))
           for name, i, o, k, s, p in specs}
  x = rng.normal(size=(2, 9, 9, cin)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    y = xt
    main = [n for n in convs if n != "downsample"]
    for i, name in enumerate(main):
      conv, bn = convs[name]
      y = bn(conv(y))
      if i < len(main) - 1:
        y = torch.relu(y)
    shortcut = xt if "downsample" not in convs else convs["downsample"][1](convs["downsample"][0](xt))
    want = torch.relu(y + shortcut).permute(0, 2, 3, 1).numpy()
  params, stats = {}, {}
  for name, (conv, bn) in convs.items():
    params[name], stats[name] = _port(conv, bn)
  block = (layers.BasicBlock if block_name == "basic" else layers.Bottleneck)(features, strides=strides)
  got = block.apply({"params": params, "batch_stats": stats}, jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
