"""DeepSpeed's ALST Ulysses (``UlyssesSPAttentionHF``) as the second peer, on real HF models.
These record what ALST does: exact on causal LMs without masks, wrong where the model needs a
mask (padding, packed documents: ALST drops every tensor mask and relies on ``is_causal``)."""
import pytest

from autosp_verify import verify_file

from .conftest import FIXTURES

pytest.importorskip("deepspeed")


def test_alst_is_exact_on_an_unmasked_causal_lm():
    r = verify_file(f"{FIXTURES}/hf_llama.py", impl="alst", world_size=4)  # 2 kv heads: ALST replicates them
    assert r.status == "pass", r.failures
    assert r.loss_abs_err < 1e-6 and r.max_grad_rel_err < 1e-12


def test_alst_drops_the_packed_documents_mask():
    """Negative control for the peer: Qwen3 with packed documents (position ids restart); ALST
    attends across documents, and the verifier names the attention."""
    r = verify_file(f"{FIXTURES}/hf_qwen3_packed.py", impl="alst", world_size=2)
    assert r.status == "fail" and r.max_grad_rel_err > 0.1
    assert "self_attn.o_proj (input)" in r.first_divergence["message"]


def test_alst_leaves_hf_attention_as_it_found_it():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    before = ALL_ATTENTION_FUNCTIONS["sdpa"]
    verify_file(f"{FIXTURES}/hf_mistral.py", impl="alst", world_size=2, steps=1)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is before


def test_alst_refusals_are_unsupported():
    r = verify_file(f"{FIXTURES}/hf_llama.py", impl="alst", world_size=2, seq_len=13)
    assert r.status == "unsupported" and "isn't divisible by sp-size=2" in r.error
    r = verify_file(f"{FIXTURES}/hf_bert_mlm.py", impl="alst", world_size=2)
    assert r.status == "unsupported" and "ForMaskedLM" in r.error
