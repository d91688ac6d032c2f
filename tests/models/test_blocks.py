"""The inception and residual blocks: shapes, shortcuts, and torchvision's blocks in torch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcv.models import blocks

RNG = np.random.default_rng(0)


def test_zero_pad_shortcut_is_strided_identity_with_zero_channels():
  """With the last BN scale at zero the block is relu(shortcut): option A is exactly visible."""
  x = RNG.normal(size=(2, 8, 8, 4)).astype(np.float32)
  block = blocks.BasicBlock(8, strides=2, shortcut="zero_pad", zero_init_residual=True)
  variables = block.init(jax.random.key(0), jnp.asarray(x))
  got = block.apply(variables, jnp.asarray(x))
  want = np.maximum(np.pad(x[:, ::2, ::2], ((0, 0), (0, 0), (0, 0), (2, 2))), 0)
  np.testing.assert_allclose(got, want, rtol=0, atol=0)
  assert "downsample" not in variables["params"]


def test_projection_shortcut_is_strided_1x1_conv():
  x = RNG.normal(size=(2, 8, 8, 4)).astype(np.float32)
  block = blocks.Bottleneck(3, strides=2, zero_init_residual=True)  # 3 x 4 = 12 outputs
  variables = block.init(jax.random.key(0), jnp.asarray(x))
  got = block.apply(variables, jnp.asarray(x))
  kernel = np.asarray(variables["params"]["downsample"]["conv"]["kernel"])[0, 0]  # (4, 12)
  eps = 1e-5  # BN at init in eval mode: (y - 0) / sqrt(1 + eps)
  want = np.maximum(np.einsum("nhwc,cd->nhwd", x[:, ::2, ::2], kernel) / np.sqrt(1 + eps), 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_inception_v1_block_concatenates_branches():
  block = blocks.InceptionV1Block(64, 96, 128, 16, 32, 32)
  x = jax.ShapeDtypeStruct((1, 28, 28, 192), jnp.float32)
  out, variables = jax.eval_shape(lambda x: block.init_with_output(jax.random.key(0), x), x)
  assert out.shape == (1, 28, 28, 64 + 128 + 32 + 32)
  assert variables["params"]["branch3"]["conv_1"]["conv"]["kernel"].shape == (3, 3, 16, 32)
  wide = blocks.InceptionV1Block(64, 96, 128, 16, 32, 32, wide_kernel=5)
  _, variables = jax.eval_shape(lambda x: wide.init_with_output(jax.random.key(0), x), x)
  assert variables["params"]["branch3"]["conv_1"]["conv"]["kernel"].shape == (5, 5, 16, 32)


def test_conv_branch_spec_defaults_and_padding():
  branch = blocks.ConvBranch([(8, 1), (8, (1, 7)), (6, 3, 2, "VALID"), (4, 3, 1)])
  x = jax.ShapeDtypeStruct((1, 17, 17, 3), jnp.float32)
  out, variables = jax.eval_shape(lambda x: branch.init_with_output(jax.random.key(0), x), x)
  assert out.shape == (1, 8, 8, 4)
  assert variables["params"]["conv_1"]["conv"]["kernel"].shape == (1, 7, 8, 8)


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
  block = (blocks.BasicBlock if block_name == "basic" else blocks.Bottleneck)(features, strides=strides)
  got = block.apply({"params": params, "batch_stats": stats}, jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
