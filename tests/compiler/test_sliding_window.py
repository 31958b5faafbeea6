"""Sliding-window models as ``from_pretrained`` gives them (``use_cache=True``, the transformers 5
default): HF's sliding-window KV cache keeps the sequence's last positions, which under sequence
parallelism live on other ranks, so ``autosp.compile`` builds no cache (``use_cache=False``, with
a warning) where the caller did not ask for one; the window itself is a mask like any other."""
import os

import pytest
import torch

import autosp
from autosp import masked_attention as ma
from autosp_verify import verify_file
from autosp_verify.core import model_functions
from autosp_verify.impls import autosp_impl

MISTRAL = os.path.join(os.path.dirname(__file__), "sliding_window_mistral.py")


def test_hf_sliding_window_model_as_loaded_is_exact():
    ma.KERNELS.clear()
    result = verify_file(MISTRAL, impl=autosp_impl("aot_eager"), world_size=2, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert sum(ma.KERNELS.values()) > 0  # the window went through autosp's masked attention


def test_a_cache_asked_for_is_refused_by_its_line():
    """Negative control: with ``use_cache=True`` passed, nothing is turned off and the cache's
    slice of the last positions is refused, naming HF's line."""
    model_fn, inputs_fn = model_functions(MISTRAL)
    batch = inputs_fn(2, 13, torch.Generator().manual_seed(0))
    step = autosp.compile(model_fn(), backend="aot_eager")
    with pytest.raises(autosp.AutoSPError, match=r"(?s)for an output.*use_cache=False.*cache_utils.py"):
        step.warm_up(2, **batch, use_cache=True)


def test_a_full_cache_is_kept_as_before(recwarn):
    """A model without a sliding window keeps its cache (this rank's chunk, as its logits): no
    cache is turned off, so on CUDA HF still calls torch's causal kernel without a mask."""
    model_fn, inputs_fn = model_functions(os.path.join(os.path.dirname(__file__), "wide_head_models.py"))
    autosp.compile(model_fn(), backend="aot_eager").warm_up(2, **inputs_fn(2, 12, torch.Generator().manual_seed(0)))
    assert not [w for w in recwarn if "KV cache" in str(w.message)]
