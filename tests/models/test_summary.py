"""Model summaries: MACs from XLA's cost analysis against hand counts and published numbers."""
import flax.linen as nn
import numpy as np
import pytest

import jcv.models as M
from jcv.models import layers


class _OneConv(nn.Module):
  padding: str = "VALID"

  @nn.compact
  def __call__(self, x, train=False):
    x = layers.Conv(8, (3, 3), padding=self.padding)(x)
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


def _valid_taps(size, k):
  # Kernel taps that land inside the image, summed over the output positions of a SAME conv.
  return sum(sum(0 <= o + d - k // 2 < size for d in range(k)) for o in range(size))


def test_macs_of_a_single_conv_match_hand_count():
  valid = M.measure_macs(_OneConv("VALID"), input_size=10)
  assert valid["macs"] == valid["nominal_macs"] == 3 * 3 * 3 * 8 * 8 * 8 + 8 * 8 * 8 * 5
  same = M.measure_macs(_OneConv("SAME"), input_size=10, batch_size=2)
  # XLA's cost analysis skips the zero padding; the nominal count includes it.
  assert same["macs"] == 2 * (_valid_taps(10, 3) ** 2 * 3 * 8 + 10 * 10 * 8 * 5)
  assert same["nominal_macs"] == 2 * (10 * 10 * 9 * 3 * 8 + 10 * 10 * 8 * 5)
  assert same["flops"] >= 2 * same["macs"]  # the whole graph: MACs x 2 plus the bias adds


def test_resnet20_macs_match_hand_count():
  rows = M.layer_table("resnet20")
  # stem 3x3x3x16 at 32x32, 6 convs of 3x3x16x16 at 32x32, 3x3x16x32 + 5 x 3x3x32x32 at 16x16,
  # 3x3x32x64 + 5 x 3x3x64x64 at 8x8, fc 64x10: the paper's ~41M.
  expected = (9 * 3 * 16 * 1024 + 6 * 9 * 16 * 16 * 1024 + (9 * 16 * 32 + 5 * 9 * 32 * 32) * 256
              + (9 * 32 * 64 + 5 * 9 * 64 * 64) * 64 + 640)
  assert sum(r["nominal_macs"] for r in rows) == expected == 40_551_040
  assert sum(r["macs"] for r in rows) < expected
  assert sum(r["params"] for r in rows) == 269_722
  assert [r["path"] for r in rows][:3] == ["stem", "stage1_block1/conv1", "stage1_block1/conv2"]


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.81), ("alexnet", 0.71)])
def test_nominal_macs_match_torchvision_docs(name, gmacs):
  # torchvision's model table ("GFLOPS", really multiply-adds) at 224 px.
  macs = M.measure_macs(name)
  assert round(macs["nominal_macs"] / 1e9, 2) == gmacs
  assert 0.85 * macs["nominal_macs"] < macs["macs"] < macs["nominal_macs"]


def test_summary_prints_card_and_table(capsys):
  text = M.summary("resnet20")
  printed = capsys.readouterr().out
  assert printed.strip() == text.strip()
  assert "Deep Residual Learning" in text and "stage3_block3/conv2" in text
  assert "269,722 trainable params" in text and "matches the reference 269,722" in text
  assert "40.55M nominal" in text
  assert M.summary("resnet20", num_classes=3, print_fn=None).count("matches") == 0


def test_count_params_collections():
  assert M.count_params("resnet20") == 269_722
  # BN statistics: mean and var per channel, 19 BN layers of 16/32/64 channels.
  assert M.count_params("resnet20", collection="batch_stats") == 2 * (16 * 7 + 32 * 6 + 64 * 6)
  with pytest.raises(ValueError, match="input_size is required"):
    M.count_params(_OneConv())
  np.testing.assert_equal(M.count_params(_OneConv(), input_size=10), 3 * 3 * 3 * 8 + 8 + 512 * 5 + 5)
