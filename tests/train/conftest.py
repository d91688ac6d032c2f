"""Training tests import their tiny helpers (tiny.py) from this folder."""
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
