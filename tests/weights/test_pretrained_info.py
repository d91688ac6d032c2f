"""jcv.weights.pretrained_info: each weight set declares its preprocessing once; its input size
is the model card's, read at call time."""
import dataclasses

import pytest

import jcv.models
import jcv.weights as W

NAMES = ["mobilenet_v1", "mobilenet_v2"] + [f"efficientnet_lite{i}" for i in range(5)]


@pytest.mark.parametrize("name", NAMES)
def test_info_has_the_weights_mean_std_and_the_cards_input_size(name):
  info = W.pretrained_info(name)
  assert isinstance(info, W.PretrainedInfo) and info.name == name
  assert info.input_size == jcv.models.get_card(name).input_size
  lite = name.startswith("efficientnet_lite")
  assert info.mean == ((127 / 255,) * 3 if lite else (0.5,) * 3)
  assert info.std == ((128 / 255,) * 3 if lite else (0.5,) * 3)
  assert info.crop_fraction == (info.input_size / (info.input_size + 32) if lite else 0.875)


def test_input_size_comes_from_the_model_card(monkeypatch):
  """Changing the card changes what the weights report: no second declaration of the size."""
  card = jcv.models.get_card
  monkeypatch.setattr(jcv.models, "get_card", lambda name: dataclasses.replace(card(name), input_size=320))
  info = W.pretrained_info("efficientnet_lite0")
  assert (info.input_size, info.crop_fraction) == (320, 320 / 352)
  assert W.pretrained_info("mobilenet_v2").config_fields()["data"]["image_size"] == 320


def test_unknown_weights_name_the_known_ones():
  with pytest.raises(ValueError, match="no pretrained weights known for 'resnet50'; known: efficientnet_lite0"):
    W.pretrained_info("resnet50")
