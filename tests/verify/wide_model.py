"""tiny_model with 16 heads, so a Ulysses split over up to 16 ranks is possible (fake-pg runs)."""
import importlib.util
import os
import sys

_spec = importlib.util.spec_from_file_location("_verify_tiny_for_wide", os.path.join(os.path.dirname(__file__),
                                                                                    "tiny_model.py"))
_tiny = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _tiny  # Dynamo resolves the model's globals through sys.modules
_spec.loader.exec_module(_tiny)
inputs_fn = _tiny.inputs_fn


def model_fn():
    return _tiny.TinyLM(hidden=32, heads=16)
