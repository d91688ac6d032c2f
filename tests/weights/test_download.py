"""Weight downloads against a real local HTTP server (no internet needed)."""
import functools
import hashlib
import http.server
import threading

import pytest

from jcv.weights import download


@pytest.fixture()
def server(tmp_path):
  root = tmp_path / "served"
  root.mkdir()
  (root / "weights.h5").write_bytes(b"0123456789" * 5000)
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  handler.log_message = lambda *a: None
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}", root
  httpd.shutdown()


def test_known_names_and_urls():
  names = download.known_weights()
  assert "mobilenet_v2_1.0_224_no_top" in names and "mobilenet_v1_0.5_160" in names
  assert download.weight_url("mobilenet_v2_1.0_224_no_top") == (
      "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
      "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
  assert download.weight_url("mobilenet_v1_0.25_128").endswith("mobilenet/mobilenet_2_5_128_tf.h5")
  with pytest.raises(ValueError, match="unknown weight name"):
    download.weight_url("mobilenet_v2_1.0_225")


def test_fetch_caches_and_pins_sha256(server, tmp_path):
  url, root = server
  payload = (root / "weights.h5").read_bytes()
  cache = tmp_path / "cache"
  path = download.fetch("x", url=f"{url}/weights.h5", directory=cache, progress=False)
  assert path.read_bytes() == payload
  pin = (cache / "weights.h5.sha256").read_text().strip()
  assert pin == hashlib.sha256(payload).hexdigest()
  (root / "weights.h5").unlink()  # a second fetch must come from the cache
  assert download.fetch("x", url=f"{url}/weights.h5", directory=cache, progress=False) == path
  path.write_bytes(b"tampered")
  with pytest.raises(download.DownloadError, match="sha256"):
    download.fetch("x", url=f"{url}/weights.h5", directory=cache, progress=False)


def test_offline_names_the_local_file_alternative(tmp_path):
  with pytest.raises(download.DownloadError) as info:
    download.fetch("x", url="http://127.0.0.1:9/none.h5", directory=tmp_path, progress=False,
                   timeout=5)
  message = str(info.value)
  assert "offline" in message and "mobilenet_v2_1.0_224_backbone.npz" in message
  assert not list(tmp_path.glob("*.part"))
