"""Walks jcv's public API and enforces its conventions (after dm-pix's api_test.py).

- every public module has ``__all__`` and every name in it exists;
- functions and classes defined in a public module and not private are listed in ``__all__``;
- every public callable has a docstring;
- a PRNG key argument is the first parameter and is named ``key`` (no ``rng``/``prng_key``);
  host-side numpy randomness (``np.random.Generator``, what grain hands a transform) is
  the first parameter too, named ``rng``;
- image ops and augmentations take at most two positional parameters (``key``/images, or
  two images); every option is keyword-only.
"""
import importlib
import inspect
import pkgutil

import pytest

import jcv

PACKAGES = ["jcv.ops", "jcv.data", "jcv.models", "jcv.train", "jcv.weights"]
# Modules whose functions follow the strict ``f(key, image, *, options)`` convention.
STRICT_PREFIXES = ("jcv.ops", "jcv.data.augment", "jcv.data.affine")
BAD_KEY_NAMES = {"rng", "prng", "prng_key", "rng_key", "seed_key"}


def _public_modules():
  names = ["jcv", "jcv.plots", "jcv.perf"]
  for pkg_name in PACKAGES:
    pkg = importlib.import_module(pkg_name)
    names.append(pkg_name)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg_name + "."):
      if not any(part.startswith("_") for part in info.name.split(".")):
        names.append(info.name)
  return names


MODULES = _public_modules()


def _public_functions(module):
  for name in module.__all__:
    obj = getattr(module, name)
    if inspect.isfunction(obj):
      yield name, obj


@pytest.mark.parametrize("module_name", MODULES)
def test_all_is_complete(module_name):
  module = importlib.import_module(module_name)
  assert hasattr(module, "__all__"), f"{module_name} has no __all__"
  for name in module.__all__:
    assert hasattr(module, name), f"{module_name}.__all__ lists missing name {name!r}"
  if module_name == "jcv":
    return
  for name, obj in vars(module).items():
    if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
      continue
    if getattr(obj, "__module__", None) == module_name:
      assert name in module.__all__, f"{module_name}.{name} is public but not in __all__"


@pytest.mark.parametrize("module_name", MODULES)
def test_docstrings(module_name):
  module = importlib.import_module(module_name)
  assert module.__doc__, f"{module_name} has no module docstring"
  for name in getattr(module, "__all__", []):
    obj = getattr(module, name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
      assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"


@pytest.mark.parametrize("module_name", MODULES)
def test_key_first_and_named_key(module_name):
  module = importlib.import_module(module_name)
  for name, fn in _public_functions(module):
    sig = inspect.signature(fn)
    params = list(sig.parameters)
    host_rng = [p for p, v in sig.parameters.items()
                if p == "rng" and "Generator" in str(v.annotation)]
    bad = BAD_KEY_NAMES.intersection(params) - set(host_rng)
    assert not bad, f"{module_name}.{name}: PRNG key must be named 'key', not {bad}"
    for first in ["key"] + host_rng:
      if first in params:
        assert params[0] == first, f"{module_name}.{name}: {first!r} must be the first parameter"


@pytest.mark.parametrize("module_name", [m for m in MODULES if m.startswith(STRICT_PREFIXES)])
def test_options_keyword_only(module_name):
  module = importlib.import_module(module_name)
  for name, fn in _public_functions(module):
    positional = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    limit = 3 if positional and positional[0].name == "key" else 2
    assert len(positional) <= limit, (
        f"{module_name}.{name}: options must be keyword-only, got positional "
        f"{[p.name for p in positional]}")


def test_lazy_subpackages():
  for name in jcv.__all__:
    assert inspect.ismodule(getattr(jcv, name))
