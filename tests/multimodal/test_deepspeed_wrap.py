"""DeepSpeed's own multimodal AutoSP (``deepspeed.sequence.auto_sp.auto_wrap_model_for_sp``,
DeepSpeed 0.19.8) on the HF ViT fixture (transformers 5.23), through the verifier, float64, threaded
simulator, P = 2 and 4, seq_len 9 (8 patches + class token: P divides the patches) and 8 (7 patches:
P does not). These tests record what DeepSpeed does, not what it should do.

Findings. DeepSpeed recognises HF 5.23's ``ViTAttention`` by name and wraps both layers, but the
wrapped model cannot run: ``ViTLayer`` passes the attention mask positionally and
``UlyssesSPViTAttention.forward(hidden_states, **kwargs)`` raises a TypeError (verdict "error").
With that one call-convention shim (the mask passed by keyword), the wrapper runs and is wrong:
nothing shards the input (the wrapper expects its caller to), so every rank all-gathers P copies of
the patches next to one class token, which reweights the softmax: the loss is off by 1.4e-3 to
3.8e-3 (same on every rank), the logits by 5e-2 to 9e-2 relative. Its all_gather is not
differentiable, and the class token (the only token the loss reads) sees the patches through
attention alone, so the patch embedding gets no gradient at all (rel err exactly 1); every other
gradient is summed over P identical ranks (rel err about P - 1). The first divergence is the first
layer's attention output (the dropout's input in ``ViTLayer.forward``, right after
``layernorm_before``). Lengths P does not divide do not crash (each rank holds the full sequence, so
the padding path never runs) and fail the same way. autosp-wrap passes every one of these cases.
"""
import functools
import os

import pytest

from autosp_verify import load_model_file, verify_file

pytest.importorskip("deepspeed")

HERE = os.path.dirname(os.path.abspath(__file__))
VIT = os.path.join(HERE, "..", "..", "fixtures", "hf_vit.py")
IMPLS = os.path.join(HERE, "deepspeed_wrap_impls.py")
AS_SHIPPED = f"{IMPLS}:deepspeed_auto_wrap"
MASK_BY_KEYWORD = f"{IMPLS}:deepspeed_auto_wrap_mask_by_keyword"
CASES = [(2, 9), (2, 8), (4, 9), (4, 8)]  # (P, seq_len): seq_len - 1 patches
IDS = [f"P{p}-S{s}" for p, s in CASES]


@pytest.fixture(autouse=True)
def _restore_deepspeed_state():
    """The impl points deepspeed.comm at the simulator's world (process-wide) and the registry of
    attention class names must stay DeepSpeed's own: put both back after each test."""
    import deepspeed.comm.comm as ds_comm
    from deepspeed.sequence import autosp_detector
    backend, names = ds_comm.cdb, set(autosp_detector._VIT_ATTN_CLASSNAMES)
    yield
    ds_comm.cdb = backend
    autosp_detector._VIT_ATTN_CLASSNAMES.clear()
    autosp_detector._VIT_ATTN_CLASSNAMES.update(names)


@functools.cache
def run(impl, world_size, seq_len):
    return verify_file(VIT, impl=impl, world_size=world_size, seq_len=seq_len, accounting=False)


def grads(result):
    return {t["name"].removeprefix("grad "): t for t in result.tensors if t["name"].startswith("grad ")}


def test_deepspeed_recognises_hf_vit_attention():
    from deepspeed.sequence.autosp_detector import _VIT_ATTN_CLASSNAMES, _VIT_HAS_CLS_TOKEN, detect_model_sp_info

    from .deepspeed_wrap_impls import attention_class_names
    model = load_model_file(VIT).model_fn()
    assert attention_class_names(model) == ["ViTAttention"]
    assert "ViTAttention" in _VIT_ATTN_CLASSNAMES and _VIT_HAS_CLS_TOKEN["ViTAttention"] is True
    info = detect_model_sp_info(model)
    assert [n for n, _ in info.vit_attn_modules] == ["vit.layers.0.attention", "vit.layers.1.attention"]
    assert not info.llm_attn_modules


@pytest.mark.parametrize("world_size,seq_len", CASES[:2], ids=IDS[:2])
def test_deepspeed_as_shipped_crashes_on_hf5_call_convention(world_size, seq_len):
    r = run(AS_SHIPPED, world_size, seq_len)
    assert r.status == "error"
    assert "(step): TypeError: UlyssesSPViTAttention.forward() takes 2 positional arguments but 3 were given" \
        in r.error


@pytest.mark.parametrize("world_size,seq_len", CASES, ids=IDS)
def test_deepspeed_wrapper_findings(world_size, seq_len):
    r = run(MASK_BY_KEYWORD, world_size, seq_len)
    assert r.status == "fail" and not r.passed and r.error is None  # no crash, also when P does not divide
    g = grads(r)

    # Grads compared by the names before the wrap ("attention.q_proj", not "attention.attn.q_proj").
    assert "vit.layers.0.attention.q_proj.weight" in g and not any(".attn." in n for n in g)
    assert len(g) == 40  # every trainable parameter of the fixture

    # Forward: not exact, but the same on every rank.
    loss = next(f for f in r.failures if f.startswith("loss"))
    assert "differs across ranks" not in loss
    assert 1e-3 < r.loss_abs_err < 5e-3  # 1.4e-3 .. 3.8e-3 on these cases
    logits = next(t for t in r.tensors if t["name"] == "logits")
    assert not logits["passed"] and 3e-2 < logits["rel_err"] < 0.1

    # Backward: the patch embedding gets no gradient at all (all_gather not differentiable, and the
    # loss reads the class token only), whatever P; the rest is summed over P identical ranks.
    for name in ("vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.patch_embeddings.projection.bias"):
        assert g[name]["rel_err"] == pytest.approx(1.0, abs=1e-6), name
    for name in ("classifier.weight", "classifier.bias", "vit.layernorm.bias", "vit.embeddings.cls_token",
                 "vit.layers.1.mlp.fc2.bias", "vit.layers.1.attention.o_proj.bias"):
        assert g[name]["rel_err"] == pytest.approx(world_size - 1, abs=0.15), name
    failing = {n for n, t in g.items() if not t["passed"]}
    # Only the key biases pass (their true gradient is zero: softmax ignores a constant shift).
    assert set(g) - failing == {"vit.layers.0.attention.k_proj.bias", "vit.layers.1.attention.k_proj.bias"}

    # First divergence: the first layer's attention output, right after layernorm_before.
    first = r.first_divergence
    assert (first["phase"], first["name"]) == ("forward", "vit.layers.0.dropout (input)"), first["message"]
    assert "ViTLayer.forward of vit.layers.0" in first["source"]
    assert "last matching value: vit.layers.0.layernorm_before" in first["message"]


@pytest.mark.parametrize("world_size,seq_len", CASES, ids=IDS)
def test_autosp_wrap_passes_the_same_cases(world_size, seq_len):
    r = run("autosp-wrap", world_size, seq_len)
    assert r.status == "pass", r.failures or r.error
    assert r.loss_abs_err == 0.0 and len(grads(r)) == 40
