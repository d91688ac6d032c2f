"""Tiny Flax models and arrays shared by the training tests (small enough for 2 CPU cores)."""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np


class TinyCNN(nn.Module):
  """conv -> (BN) -> relu -> pool -> dropout -> dense; ``use_bn=False`` for exact-SPMD checks."""
  num_classes: int = 10
  use_bn: bool = True
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), use_bias=not self.use_bn)(x)
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes)(x)


def random_images(n, *, size=8, num_classes=10, seed=0):
  """(uint8 [n, size, size, 3], int32 [n]) with a learnable class signal in the mean colour."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.int32)
  images = rng.integers(0, 160, (n, size, size, 3))
  images[..., 0] += (labels * 9)[:, None, None]
  return np.clip(images, 0, 255).astype(np.uint8), labels


def array_sources(n_train=256, n_eval=100, *, size=8, num_classes=10):
  """(train, eval) jcv ArraySources of random_images."""
  from jcv.data.sources import ArraySource
  names = [f"class{i}" for i in range(num_classes)]
  x, y = random_images(n_train, size=size, num_classes=num_classes, seed=0)
  xe, ye = random_images(n_eval, size=size, num_classes=num_classes, seed=1)
  return ArraySource(x, y, class_names=names), ArraySource(xe, ye, class_names=names)


def read_tensorboard(folder):
  """{tag: [(step, value or "image")]} from the TFRecord event files under ``folder``."""
  import pathlib
  import struct

  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(pathlib.Path(folder).rglob("events.out.tfevents.*")):
    data = path.read_bytes()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4  # length, its crc, the record, its crc
      for v in event.summary.value:
        kind = v.WhichOneof("value")
        out.setdefault(v.tag, []).append((event.step, v.simple_value if kind == "simple_value" else kind))
  return out
