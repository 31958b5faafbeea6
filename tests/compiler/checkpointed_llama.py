"""The HF Llama fixture as a user trains it at long sequence: activation checkpointing on (every
layer a torch.utils.checkpoint region), the default config otherwise (use_cache=True)."""
import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "hf_llama_fixture", os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "hf_llama.py"))
_llama = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_llama)

inputs_fn = _llama.inputs_fn
LAYERS = 2


def model_fn():
    model = _llama.model_fn()
    assert model.config.num_hidden_layers == LAYERS and model.config.use_cache
    model.activation_checkpointing_enable()
    return model
