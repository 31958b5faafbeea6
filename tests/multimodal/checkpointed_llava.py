"""The LLaVA fixture as a user trains it at long sequence: HF activation checkpointing on (every
vision and text layer recomputed in the backward, torch's default use_reentrant=False)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "hf_llava_fixture", os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "hf_llava.py"))
_llava = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_llava)

inputs_fn = _llava.inputs_fn


def model_fn():
    model = _llava.model_fn()
    model.activation_checkpointing_enable()
    return model
