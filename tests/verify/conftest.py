"""Shared paths for the verifier tests; the repo root made importable when run as plain `pytest`."""
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
if ROOT not in sys.path:  # pytest puts tests/ (not the root) on sys.path; the package may not be installed
    sys.path.insert(0, ROOT)

TINY = os.path.join(HERE, "tiny_model.py")
WIDE = os.path.join(HERE, "wide_model.py")
ULYSSES = os.path.join(HERE, "ulysses_impls.py")
BROKEN = os.path.join(HERE, "broken_impls.py")


def ulysses(name="ulysses"):
    return f"{ULYSSES}:{name}"


def broken(name):
    return f"{BROKEN}:{name}"


@pytest.fixture
def tiny():
    return TINY
