"""Cross-entropy, label smoothing and top-k against numpy references."""
import numpy as np
import pytest

from jcv.train import losses


def _np_ce(logits, soft):
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -(soft * logp).sum(-1)


def test_cross_entropy_int_soft_and_smoothing():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
  labels = rng.integers(0, 5, 6)
  onehot = np.eye(5, dtype=np.float32)[labels]
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), _np_ce(logits, onehot), rtol=1e-5)
  smooth = onehot * 0.9 + 0.1 / 5
  np.testing.assert_allclose(losses.cross_entropy(logits, labels, label_smoothing=0.1),
                             _np_ce(logits, smooth), rtol=1e-5)
  soft = rng.dirichlet(np.ones(5), 6).astype(np.float32)
  np.testing.assert_allclose(losses.cross_entropy(logits, soft), _np_ce(logits, soft), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_topk_matches_argsort(k):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(50, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 50)
  want = np.array([lab in np.argsort(-row)[:k] for row, lab in zip(logits, labels)], np.float32)
  np.testing.assert_array_equal(losses.topk_correct(logits, labels, k=k), want)
