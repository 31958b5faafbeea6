"""Sliding-window models as ``from_pretrained`` gives them (``use_cache=True``, the transformers 5
default): HF's sliding-window KV cache keeps the sequence's last positions, which under sequence
parallelism live on other ranks, so ``autosp.compile`` builds no cache (``use_cache=False``, with
a warning) where the caller did not ask for one; the window itself is a mask like any other, its
rows a run torch's fused kernel takes (``autosp/mask_runs.py``)."""
import os

import pytest
import torch

import autosp
from autosp import masked_attention as ma
from autosp_verify import verify_file
from autosp_verify.core import model_functions
from autosp_verify.impls import autosp_impl

MISTRAL = os.path.join(os.path.dirname(__file__), "sliding_window_mistral.py")


def _verified(world_size, seq_len, **kwargs):
    ma.KERNELS.clear()
    result = verify_file(MISTRAL, impl=autosp_impl("aot_eager"), world_size=world_size, seq_len=seq_len, **kwargs)
    return result, dict(ma.KERNELS)


@pytest.mark.slow
def test_hf_sliding_window_model_as_loaded_is_exact_on_the_fused_kernel():
    """The window (5 keys; 13 positions) is a run torch's kernel takes 4 rows at a time: the
    diagonal causally, the earlier keys flipped (autosp/mask_runs.py). In the default run: HF
    Gemma3 as loaded (tests/verify/test_precision.py), a sliding window with its cache too."""
    result, kernels = _verified(2, 13)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert kernels.get("fused", 0) > 0 and kernels.get("blocks", 0) == 0, kernels


@pytest.mark.slow  # CI's budget: the kernel-mask control in test_masks.py catches it in the default run
def test_negative_control_the_earlier_keys_not_flipped_are_caught(monkeypatch):
    """The earlier keys' call run causally as they come (not in reverse order): each row then
    sees the wrong ones of them, and the verifier fails it."""
    from autosp import mask_runs
    monkeypatch.setattr(mask_runs, "_flipped", lambda kind, *tensors: list(tensors))
    result, kernels = _verified(2, 13, diagnose=False, steps=1, accounting=False)
    assert kernels.get("fused", 0) > 0
    assert result.status == "fail", (result.status, result.error)


@pytest.mark.slow
def test_hf_sliding_window_past_the_head_count_is_exact_on_the_fused_kernel():
    """P=16 over 8 heads: a rank's block of 2 queries against every key (41 s)."""
    result, kernels = _verified(16, 32)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert kernels.get("fused", 0) > 0 and kernels.get("blocks", 0) == 0, kernels


def test_a_cache_asked_for_is_refused_by_its_line():
    """Negative control: with ``use_cache=True`` passed, nothing is turned off and the cache's
    slice of the last positions is refused, naming HF's line."""
    model_fn, inputs_fn = model_functions(MISTRAL)
    batch = inputs_fn(2, 13, torch.Generator().manual_seed(0))
    step = autosp.compile(model_fn(), backend="aot_eager")
    with pytest.raises(autosp.AutoSPError, match=r"(?s)for an output.*use_cache=False builds none.*cache_utils.py"):
        step.warm_up(2, **batch, use_cache=True)


def test_a_full_cache_is_kept_as_before(recwarn):
    """A model without a sliding window keeps its cache (this rank's chunk, as its logits): no
    cache is turned off, so on CUDA HF still calls torch's causal kernel without a mask."""
    model_fn, inputs_fn = model_functions(os.path.join(os.path.dirname(__file__), "wide_head_models.py"))
    autosp.compile(model_fn(), backend="aot_eager").warm_up(2, **inputs_fn(2, 12, torch.Generator().manual_seed(0)))
    assert not [w for w in recwarn if "KV cache" in str(w.message)]
