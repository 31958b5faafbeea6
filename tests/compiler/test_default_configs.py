"""HF families as ``from_pretrained`` returns them: each config class's defaults (``use_cache=True``,
so transformers 5 builds a DynamicCache in the training forward; its own attention and rope
defaults), only the sizes made tiny. Exact against one device in float64 at P=2 on a length P does
not divide. No fixture of this repository is shaped for these models."""
import pytest
import torch
import transformers

from autosp_verify import verify

VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, attn_implementation="sdpa")
NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # 0.1 by default: nothing to compare
FAMILIES = {  # config class prefix: the config's own names for what TINY sets, where they differ
    "Qwen3": dict(num_key_value_heads=2, head_dim=8),
    "Phi3": dict(pad_token_id=0),
    "GPTNeoX": dict(),
    "Olmo2": dict(num_key_value_heads=2),
    "StableLm": dict(num_key_value_heads=4),
    "Granite": dict(num_key_value_heads=2),
    "SmolLM3": dict(num_key_value_heads=2, pad_token_id=0),
    "Falcon": dict(),  # multi-query: SDPA broadcasts its one kv head over the query heads
    "GPTBigCode": NO_DROPOUT,  # multi-query too, and `hidden_states.view(input_shape + (H,))`
    "GPT2": NO_DROPOUT,  # Conv1D: torch.addmm(bias, x.view(-1, H), weight)
    "Apertus": dict(num_key_value_heads=2),  # xIELU: torch.min(x, eps), elementwise
    "Exaone4": dict(num_key_value_heads=2),  # a sliding-window cache longer than the sequence
    "Llama4Text": dict(num_key_value_heads=2, moe_layers=[]),  # complex rope (view_as_complex); no MoE
}
MODEL_CLASS = {"Llama4Text": "Llama4ForCausalLM", "GPT2": "GPT2LMHeadModel"}
# The rest under `make test-all` (GPTBigCode runs by default in tests/verify/test_randomness.py).
DEFAULT_RUN = {"Qwen3", "GPTNeoX", "Falcon", "GPT2"}


def _model_fn(family):
    config = getattr(transformers, f"{family}Config")(**TINY, **FAMILIES[family])
    assert config.use_cache  # the default this module exists for
    model_class = getattr(transformers, MODEL_CLASS.get(family, f"{family}ForCausalLM"))

    def model_fn():
        return model_class(config).float().train()
    return model_fn


def causal_inputs(batch, seq_len, generator):
    ids = torch.randint(1, VOCAB, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("family", [f if f in DEFAULT_RUN else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(FAMILIES)])
def test_default_config_is_exact(family):
    result = verify(_model_fn(family), causal_inputs, impl="autosp-eager", dtype=torch.float64,
                    world_size=2, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])


def test_negative_control_a_broadcast_kv_head_split_like_query_heads_is_caught(monkeypatch):
    """Falcon's one kv head split over the ranks like its query heads (rank 1 gets a zero head,
    as it did before ``_broadcasts_one_kv_head``): the verifier fails it."""
    from autosp.passes import attention
    monkeypatch.setattr(attention, "_broadcasts_one_kv_head", lambda *args: False)
    torch._dynamo.reset()  # Dynamo would reuse an earlier test's graph; and no later test this one's
    try:
        result = verify(_model_fn("Falcon"), causal_inputs, impl="autosp-eager", dtype=torch.float64,
                        world_size=2, seq_len=13)
    finally:
        torch._dynamo.reset()
    assert result.status == "fail", (result.status, result.error)


def test_bidirectional_encoder_without_a_mask_is_exact():
    """BERT with no attention_mask: SDPA with is_causal=False and no mask at all, each rank's queries
    against every key after the all-to-all (the padded fixture, hf_bert_mlm, covers the masked case)."""
    def model_fn():
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
        return transformers.BertForMaskedLM(config).float().train()

    def inputs_fn(batch, seq_len, generator):
        ids = torch.randint(4, VOCAB, (batch, seq_len), generator=generator)
        labels = torch.where(torch.rand(batch, seq_len, generator=generator) < 0.5, ids, -100)
        labels[:, 0] = ids[:, 0]
        return {"input_ids": ids, "labels": labels}

    for world_size in (2, 4):
        result = verify(model_fn, inputs_fn, impl="autosp-eager", dtype=torch.float64, world_size=world_size,
                        seq_len=13)
        assert result.passed, (result.status, result.error, result.failures[:5])
