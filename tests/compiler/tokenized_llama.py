"""The HF Llama fixture as loaded (use_cache=True) with the batch a tokenizer gives: an
``attention_mask`` of ones beside the ids. HF cannot prove under torch.compile that the mask
hides nothing, so it builds one."""
import importlib.util
import os

import torch

_spec = importlib.util.spec_from_file_location(
    "hf_llama_fixture", os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "hf_llama.py"))
_llama = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_llama)

model_fn = _llama.model_fn


def inputs_fn(batch, seq_len, generator):
    inputs = _llama.inputs_fn(batch, seq_len, generator)
    return {**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}
