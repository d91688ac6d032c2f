"""The MobileNetV2 ImageNet port against the Keras reference outputs in ../shared/weights."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jcv.weights as W
from jcv.weights import port

CAT_CLASSES = {282, 283, 284, 285, 286}  # tabby, tiger cat, Persian, Siamese, Egyptian cat (1001 ids)
ESPRESSO = 968


@pytest.fixture(scope="module")
def files(shared_dir):
  d = shared_dir / "weights"
  return {"backbone": d / "mobilenet_v2_1.0_224_backbone.npz",
          "head": d / "mobilenet_v2_1.0_224_head_1001.npz",
          "labels": d / "imagenet_labels_1001.txt",
          "reference": np.load(d / "reference_outputs.npz", allow_pickle=False)}


@pytest.fixture(scope="module")
def classifier(files):
  model, variables = W.pretrained("mobilenet_v2", files["backbone"], num_classes=1001, head=files["head"])
  return jax.jit(model.apply), variables


def _inputs(images_uint8, size=224):
  x = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0
  if size != x.shape[1]:
    x = jax.image.resize(x, (x.shape[0], size, size, 3), "linear", antialias=True)
  return x


def test_pooled_features_match_keras_reference(files):
  model, variables = W.pretrained("mobilenet_v2", files["backbone"], num_classes=0)
  ref = files["reference"]
  features = np.asarray(jax.jit(model.apply)(variables, _inputs(ref["images_uint8"])))
  expected = ref["pooled_features"]
  assert features.shape == (4, 1280)
  relative = np.linalg.norm(features - expected, axis=1) / np.linalg.norm(expected, axis=1)
  assert relative.max() < 1e-4, relative
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_imagenet_head_top5_matches_readme(files, classifier):
  apply, variables = classifier
  ref = files["reference"]
  logits = np.asarray(apply(variables, _inputs(ref["images_uint8"])))
  np.testing.assert_allclose(logits, ref["logits"], rtol=1e-4, atol=2e-4)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  names = list(ref["names"])
  # Top-5 listed in ../shared/weights/README.md ("What was verified", item 4).
  assert list(top5[names.index("chelsea")]) == [283, 282, 286, 288, 905]
  assert list(top5[names.index("coffee")]) == [968, 926, 961, 969, 810]
  assert list(top5[names.index("rocket")]) == [658, 745, 669, 438, 683]
  labels = W.imagenet_labels(files["labels"])
  assert len(labels) == 1001 and labels[ESPRESSO] == "espresso"


@pytest.mark.parametrize("size", [160, 128])
def test_port_works_at_smaller_inputs(files, classifier, size):
  apply, variables = classifier
  ref = files["reference"]
  names = list(ref["names"])
  logits = np.asarray(apply(variables, _inputs(ref["images_uint8"], size)))
  assert logits.shape == (4, 1001)
  assert int(np.argmax(logits[names.index("chelsea")])) in CAT_CLASSES
  assert int(np.argmax(logits[names.index("coffee")])) == ESPRESSO


def test_fresh_head_keeps_backbone(files):
  model, variables = W.pretrained("mobilenet_v2", files["backbone"], num_classes=10, seed=3)
  arrays = port.read_arrays(files["backbone"])
  np.testing.assert_array_equal(variables["params"]["stem"]["conv"]["kernel"], arrays["Conv_weights"])
  np.testing.assert_array_equal(variables["batch_stats"]["block_5"]["depthwise"]["bn"]["var"],
                                arrays["expanded_conv_5_depthwise_BatchNorm_moving_variance"])
  np.testing.assert_array_equal(variables["params"]["block_5"]["depthwise"]["conv"]["kernel"][:, :, 0, :],
                                arrays["expanded_conv_5_depthwise_depthwise_weights"][:, :, :, 0])
  head = variables["params"]["head"]
  assert head["kernel"].shape == (1280, 10) and float(jnp.std(head["kernel"])) > 0
  assert model.num_classes == 10


def _save_npz(path, arrays):
  np.savez(path, **arrays)
  return path


def test_partial_or_wrong_file_lists_names(files, tmp_path):
  arrays = port.read_arrays(files["backbone"])
  broken = dict(arrays)
  del broken["expanded_conv_7_project_weights"]
  broken["expanded_conv_3_expand_BatchNorm_gamma"] = np.ones((7,), np.float32)
  broken["some_extra_array"] = np.zeros((2,), np.float32)
  with pytest.raises(W.PortError) as info:
    W.pretrained("mobilenet_v2", _save_npz(tmp_path / "broken.npz", broken))
  error = info.value
  assert error.missing == ["expanded_conv_7_project_weights"]
  assert error.unexpected == ["some_extra_array"]
  assert len(error.mismatched) == 1 and "expanded_conv_3_expand_BatchNorm_gamma" in error.mismatched[0]
  message = str(error)
  for name in ("expanded_conv_7_project_weights", "some_extra_array", "(7,)"):
    assert name in message


def test_wrong_width_is_reported(files):
  with pytest.raises(W.PortError, match="mismatched"):
    W.pretrained("mobilenet_v2", files["backbone"], width=0.5)


def test_pickled_npz_is_refused(tmp_path):
  path = tmp_path / "pickled.npz"
  np.savez(path, Conv_weights=np.array([{"evil": 1}], dtype=object))
  with pytest.raises(ValueError, match="allow_pickle"):
    port.read_arrays(path)


# Keras applications layer names, written out here independently of jcv.weights.port.
def _keras_name(slim: str) -> str:
  bn = {"gamma": "gamma", "beta": "beta", "moving_mean": "moving_mean", "moving_variance": "moving_variance"}
  if slim.startswith("Conv_1_"):
    layer, rest = "Conv_1", slim[len("Conv_1_"):]
    layer_bn = "Conv_1_bn"
  elif slim.startswith("Conv_"):
    layer, rest, layer_bn = "Conv1", slim[len("Conv_"):], "bn_Conv1"
  else:
    tail = slim[len("expanded_conv_"):]
    first = tail.split("_")[0]
    if first.isdigit():
      block, rest = f"block_{first}", tail[len(first) + 1:]
    else:
      block, rest = "expanded_conv", tail
    kind = rest.split("_")[0]
    rest = rest[len(kind) + 1:]
    layer = f"{block}_{kind}"
    layer_bn = layer + "_BN"
  if rest.startswith("BatchNorm_"):
    return f"{layer_bn}/{bn[rest[len('BatchNorm_'):]]}"
  return f"{layer}/{'depthwise_kernel' if rest == 'depthwise_weights' else 'kernel'}"


def _write_keras_h5(path, arrays, extra_layers=None):
  h5py = pytest.importorskip("h5py")
  layers = {}
  for slim, value in arrays.items():
    layer, weight = _keras_name(slim).split("/")
    layers.setdefault(layer, {})[weight] = value
  layers.update(extra_layers or {})
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [n.encode() for n in layers]
    for layer, weights in layers.items():
      group = f.create_group(layer)
      names = [f"{layer}/{w}:0" for w in weights]
      group.attrs["weight_names"] = [n.encode() for n in names]
      for name, value in zip(names, weights.values()):
        group.create_dataset(name, data=value)
  return path


def test_keras_h5_gives_the_same_model(files, tmp_path):
  arrays = port.read_arrays(files["backbone"])
  h5 = _write_keras_h5(tmp_path / "mobilenet_v2_no_top.h5", arrays)
  assert len(port.read_arrays(h5)) == 260
  _, from_slim = W.pretrained("mobilenet_v2", files["backbone"])
  _, from_keras = W.pretrained("mobilenet_v2", h5)
  jax.tree.map(np.testing.assert_array_equal, from_slim, from_keras)


def test_keras_h5_with_top_keeps_classifier(files, tmp_path):
  arrays = port.read_arrays(files["backbone"])
  kernel = np.random.default_rng(0).normal(size=(1280, 1000)).astype(np.float32)
  top = {"predictions": {"kernel": kernel, "bias": np.zeros(1000, np.float32)}}
  h5 = _write_keras_h5(tmp_path / "mobilenet_v2_top.h5", arrays, top)
  _, variables = W.pretrained("mobilenet_v2", h5, num_classes=1000)
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], kernel)
  _, features_only = W.pretrained("mobilenet_v2", h5, num_classes=0)  # classifier ignored
  assert "head" not in features_only["params"]


def test_unknown_source_message():
  with pytest.raises(ValueError, match="neither an existing file nor a known download"):
    W.pretrained("mobilenet_v2", "/no/such/file.npz")
