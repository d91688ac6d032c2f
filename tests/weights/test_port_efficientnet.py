"""The EfficientNet-Lite2 port (PyTorch state dict) against the reference outputs in ../shared/weights."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

import jcv.weights as W
from jcv.weights import port

EGYPTIAN_CAT, ESPRESSO = 285, 967  # 1000-class ids (line i + 1 of imagenet_labels_1001.txt)


@pytest.fixture(scope="module")
def files(shared_dir):
  d = shared_dir / "weights"
  return {"weights": d / "efficientnet_lite2.npz", "labels": d / "imagenet_labels_1001.txt",
          "mobilenet": d / "mobilenet_v2_1.0_224_backbone.npz",
          "reference": dict(np.load(d / "efficientnet_lite2_reference_outputs.npz", allow_pickle=False))}


@pytest.fixture(scope="module")
def classifier(files):
  model, variables = W.pretrained("efficientnet_lite2", files["weights"], num_classes=1000)
  return jax.jit(model.apply), variables


def _relative(got, expected):
  return np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)


def test_pooled_features_match_reference(files):
  model, variables = W.pretrained("efficientnet_lite2", files["weights"], num_classes=0)
  ref = files["reference"]
  x = W.pretrained_info("efficientnet_lite2").normalize(ref["images_uint8"])
  features = np.asarray(jax.jit(model.apply)(variables, x))
  assert features.shape == (4, 1280)
  assert _relative(features, ref["pooled_features"]).max() < 1e-4
  np.testing.assert_allclose(features, ref["pooled_features"], rtol=1e-4, atol=1e-4)


def test_logits_and_top1_match_reference(files, classifier):
  apply, variables = classifier
  ref = files["reference"]
  logits = np.asarray(apply(variables, W.pretrained_info("efficientnet_lite2").normalize(ref["images_uint8"])))
  assert _relative(logits, ref["logits"]).max() < 1e-4
  np.testing.assert_array_equal(logits.argmax(1), ref["logits"].argmax(1))
  names = [str(n) for n in ref["names"]]
  assert logits.argmax(1)[names.index("chelsea.png")] == EGYPTIAN_CAT
  assert logits.argmax(1)[names.index("coffee.png")] == ESPRESSO


def test_odd_input_size_still_classifies(files, classifier):
  """TF SAME padding at a size the weights never saw (odd at every stride-2 layer)."""
  apply, variables = classifier
  ref = files["reference"]
  x = W.pretrained_info("efficientnet_lite2").normalize(ref["images_uint8"][1:3, :227, 16:243])
  assert list(np.asarray(apply(variables, x)).argmax(1)) == [EGYPTIAN_CAT, ESPRESSO]


def test_info_and_fresh_head(files):
  info = W.pretrained_info("efficientnet_lite2")
  assert (info.input_size, info.preprocessing) == (260, "(x - 127) / 128")
  np.testing.assert_allclose(info.normalize(np.array([0, 127, 255], np.uint8)), [-127 / 128, 0, 1], atol=1e-6)
  assert W.pretrained_info("mobilenet_v2").mean == (0.5,) * 3
  from jcv.train import Config
  config = Config().replace(**info.config_fields())
  assert (config.model.name, config.data.image_size, config.data.mean, config.data.std) == (
      "efficientnet_lite2", 260, (127 / 255,) * 3, (128 / 255,) * 3)
  assert config.evaluation.crop_fraction == pytest.approx(260 / 292)
  assert [W.pretrained_info(f"efficientnet_lite{i}").input_size for i in range(5)] == [224, 240, 260, 280, 300]
  with pytest.raises(ValueError, match="no pretrained weights known for 'resnet50'"):
    W.pretrained_info("resnet50")
  assert W.classifier_classes("efficientnet_lite2", files["weights"]) == 1000
  model, variables = W.pretrained("efficientnet_lite2", files["weights"], num_classes=10, seed=1)
  arrays = port.read_arrays(files["weights"])
  np.testing.assert_array_equal(variables["params"]["block_4"]["depthwise"]["conv"]["kernel"],
                                arrays["_blocks.4._depthwise_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["batch_stats"]["last_conv"]["bn"]["var"], arrays["_bn1.running_var"])
  assert variables["params"]["head"]["kernel"].shape == (1280, 10) and model.num_classes == 10


def _save(path, arrays):
  np.savez(path, **arrays)
  return path


def test_wrong_files_are_refused_with_names(files, tmp_path):
  with pytest.raises(W.PortError, match="is it the weights of another model") as info:
    W.pretrained("efficientnet_lite2", files["mobilenet"])
  assert "_conv_stem.weight" in info.value.missing and "Conv_weights" in info.value.unexpected
  with pytest.raises(W.PortError) as info:  # Lite2's file into Lite0: other widths and depth
    W.pretrained("efficientnet_lite0", files["weights"])
  assert info.value.mismatched and "_blocks.20._project_conv.weight" in info.value.unexpected
  arrays = port.read_arrays(files["weights"])
  broken = {k: v for k, v in arrays.items() if k != "_blocks.7._bn1.running_mean"}
  broken["_blocks.3._project_conv.weight"] = arrays["_blocks.3._project_conv.weight"][:, :-1]
  broken["_extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(W.PortError) as info:
    W.pretrained("efficientnet_lite2", _save(tmp_path / "broken.npz", broken))
  error = info.value
  assert error.missing == ["_blocks.7._bn1.running_mean"] and error.unexpected == ["_extra.weight"]
  assert len(error.mismatched) == 1 and "_blocks.3._project_conv.weight (1, 1, 143, 24)" in error.mismatched[0]
  for text in ("_blocks.7._bn1.running_mean", "_extra.weight", "block_3/project/conv/kernel"):
    assert text in str(error)
  with pytest.raises(ValueError, match="no port of .h5 files for 'efficientnet_lite2'"):
    W.pretrained("efficientnet_lite2", _save(tmp_path / "x.npz", {}).rename(tmp_path / "x.h5"))


def test_pth_loads_with_weights_only(files, tmp_path):
  torch = pytest.importorskip("torch")
  arrays = port.read_arrays(files["weights"])
  path = tmp_path / "efficientnet_lite2.pth"
  torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
  _, from_pth = W.pretrained("efficientnet_lite2", path, num_classes=1000)
  _, from_npz = W.pretrained("efficientnet_lite2", files["weights"], num_classes=1000)
  jax.tree.map(np.testing.assert_array_equal, from_pth, from_npz)
  import fractions
  torch.save({"x": fractions.Fraction(1, 3)}, tmp_path / "code.pth")  # arbitrary objects: refused
  with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
    port.read_arrays(tmp_path / "code.pth")


def test_pth_without_torch_says_how(monkeypatch, tmp_path):
  import sys
  monkeypatch.setitem(sys.modules, "torch", None)
  (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 a torch zip archive")  # non-empty: an empty file is refused first
  with pytest.raises(ValueError, match="needs PyTorch"):
    port.read_arrays(tmp_path / "w.pth")


def test_port_table_is_data():
  table = port.TORCH_EFFICIENTNET_LITE
  assert table(("params", "block_12", "expand", "conv", "kernel")) == ("_blocks.12._expand_conv.weight", "oihw")
  assert table(("batch_stats", "stem", "bn", "var")) == ("_bn0.running_var", "same")
  assert table(("params", "head", "kernel")) == ("_fc.weight", "oi")
  assert table.is_head("_fc.bias") and table.is_ignorable("_bn0.num_batches_tracked")
  assert table(("params", "nowhere", "kernel"))[0] == "<no rule for nowhere/kernel>"
  assert port.convert(np.zeros((7, 1, 5, 5)), "oihw", (5, 5, 1, 7)).shape == (5, 5, 1, 7)


def test_predict_command_gives_reference_top1(files, tmp_path, capsys):
  from jcv.__main__ import main
  ref = files["reference"]
  paths = []
  for name, image in zip(ref["names"], ref["images_uint8"]):
    paths.append(str(tmp_path / str(name)))
    Image.fromarray(image).save(paths[-1])
  assert main(["predict", "--pretrained", "efficientnet_lite2", "--weights", str(files["weights"]),
               "--labels", str(files["labels"]), "--top-k", "2", *paths]) == 0
  rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  labels = W.imagenet_labels(files["labels"])[1:]
  assert [row["top"][0][0] for row in rows] == [labels[i] for i in ref["logits"].argmax(1)]
  assert rows[1]["top"][0][0] == "Egyptian cat" and rows[2]["top"][0][0] == "espresso"
  assert main(["predict", "--pretrained", "efficientnet_lite2", paths[0]]) == 2  # no --weights
  assert main(["predict", "--pretrained", "mobilenet_v2", "--weights", str(files["mobilenet"]), paths[0]]) == 2
  assert "holds no classifier; pass --head" in capsys.readouterr().err
