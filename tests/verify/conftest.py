"""Shared paths for the verifier tests."""
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

TINY = os.path.join(HERE, "tiny_model.py")
WIDE = os.path.join(HERE, "wide_model.py")
ULYSSES = os.path.join(HERE, "ulysses_impls.py")
BROKEN = os.path.join(HERE, "broken_impls.py")
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(HERE)), "fixtures")


def ulysses(name="ulysses"):
    return f"{ULYSSES}:{name}"


def broken(name):
    return f"{BROKEN}:{name}"


@pytest.fixture
def tiny():
    return TINY
