"""Attention written out (``softmax(q @ k^T) @ v``: HF's eager kernels, nanoGPT): the model's own
ops on each rank's heads over the whole sequence (autosp/passes/written_attention.py). Exact
against one device; what cannot be split by heads refused with its line; a rank given the wrong
heads of a per-head value caught by the verifier."""
import pytest
import torch
import transformers

import autosp
from autosp.passes import written_attention
from autosp_verify import verify

from .test_default_configs import TINY, causal_inputs
from .written_attention_models import (Alibi, Attention, ChunkBias, Differential, Einsum, EinsumSequenceFirst,
                                       GroupedSoftcapSinks, MixesHeads, ReturnsWeights, WrittenLM, inputs_fn)


def _verify(attention, world_size=2, impl="autosp-eager"):
    return verify(lambda: WrittenLM(attention), inputs_fn, impl=impl, dtype=torch.float64, world_size=world_size,
                  seq_len=13)


@pytest.mark.parametrize("attention, world_size", [(Attention, 2), (GroupedSoftcapSinks, 4), (Alibi, 2), (Einsum, 4),
                                                   (EinsumSequenceFirst, 2)])
def test_attention_written_out_is_exact(attention, world_size):
    before = dict(autosp.COUNTERS)
    result = _verify(attention, world_size)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert result.accounting["collectives"]["at_minimum"], result.accounting["collectives"]  # Ulysses' bytes
    grew = {k for k in autosp.COUNTERS if autosp.COUNTERS[k] > before.get(k, 0)}
    assert "written_attention" in grew
    if attention is GroupedSoftcapSinks:  # 2 kv heads over 4 ranks: sent twice each, repeated after
        assert {"head_chunk", "kv_repeat_moved_after"} <= grew


def test_hf_eager_attention_through_aot_autograd_at_the_minimum_bytes():
    """HF's ``eager_attention_forward`` (Llama, 4 query / 2 kv heads) compiled as loaded: exact,
    and the model's repeat of the kv heads moved after the all-to-all (the Ulysses minimum)."""
    config = transformers.LlamaConfig(**{**TINY, "attn_implementation": "eager"}, num_key_value_heads=2)
    result = verify(lambda: transformers.LlamaForCausalLM(config).float().train(), causal_inputs, impl="autosp",
                    dtype=torch.float64, world_size=2, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])
    collectives = result.accounting["collectives"]
    assert collectives["at_minimum"], collectives


SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
NO_SDPA = {  # HF families whose only kernel here is eager: their configs' defaults, the sizes tiny
    "Gemma2": (SIZES, torch.float64),  # a tanh softcap on the scores, sliding windows
    "GptOss": ({**SIZES, "num_local_experts": 4, "num_experts_per_tok": 2}, torch.float32),  # sinks; MoE (grouped_mm)
    "Mpt": (dict(vocab_size=64, d_model=32, n_heads=4, n_layers=2, max_seq_len=128), torch.float64),  # ALiBi
}


@pytest.mark.parametrize("family", sorted(NO_SDPA))
def test_hf_models_without_sdpa_are_exact_as_loaded(family):
    sizes, dtype = NO_SDPA[family]
    config = getattr(transformers, f"{family}Config")(**sizes)
    model_class = getattr(transformers, f"{family}ForCausalLM")
    assert model_class(config).config._attn_implementation == "eager"  # what these models get
    result = verify(lambda: model_class(config).train(), causal_inputs, impl="autosp-eager", dtype=dtype,
                    world_size=4, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])


@pytest.mark.parametrize("attention, why", [
    (ReturnsWeights, "the model's outputs read this value"),
    (MixesHeads, "einsum"),
    (ChunkBias, "a chunk of the sequence"),
    (Differential, "two attention weights"),
])
def test_what_cannot_be_split_by_heads_is_refused_with_its_line(attention, why):
    result = _verify(attention)
    assert result.status == "unsupported", (result.status, result.error)
    assert why in result.error and "written_attention_models.py" in result.error, result.error


def test_negative_control_every_rank_given_the_first_heads_of_a_per_head_value_fails(monkeypatch):
    """GPT-OSS-style sinks cut to rank 0's heads on every rank: the verifier fails it."""
    def first_heads(x, head_dim, group, world_size):
        return x.narrow(head_dim, 0, -(-x.shape[head_dim] // world_size))
    monkeypatch.setattr(written_attention, "HEAD_CHUNK", first_heads)
    torch._dynamo.reset()
    try:
        assert _verify(GroupedSoftcapSinks).status == "fail"
    finally:
        torch._dynamo.reset()


class NanoGPT(torch.nn.Module):
    """nanoGPT's signature: ``forward(idx, targets)``, names autosp does not know."""

    def __init__(self):
        super().__init__()
        self.lm = WrittenLM(Attention)

    def forward(self, idx, targets):
        return self.lm(idx, targets)


def nanogpt_inputs(batch, seq_len, generator):
    ids = inputs_fn(batch, seq_len, generator)["input_ids"]
    return {"idx": ids, "targets": ids.clone()}


def test_inputs_by_names_of_its_own_carry_the_sequence_by_position_or_keyword():
    """The first tensor input is the sequence, and every other of its length (the targets) too."""
    result = verify(NanoGPT, nanogpt_inputs, impl="autosp-eager", dtype=torch.float64, world_size=2, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])
    batch = nanogpt_inputs(2, 13, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    autosp.compile(NanoGPT().double(), backend="eager").warm_up(2, batch["idx"], batch["targets"])


@pytest.mark.slow
def test_hf_eager_attention_under_activation_checkpointing_is_exact():
    """HF's activation checkpointing around layers whose attention is written out: each layer's
    region recomputed in the backward, its all-to-alls included."""
    config = transformers.LlamaConfig(**{**TINY, "attn_implementation": "eager"}, num_key_value_heads=2)

    def model_fn():
        model = transformers.LlamaForCausalLM(config).float().train()
        model.gradient_checkpointing_enable()
        return model
    result = verify(model_fn, causal_inputs, impl="autosp", dtype=torch.float64, world_size=2, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert result.accounting["collectives"]["measured"]["all_to_all"] > 16  # q, k, v sent again
