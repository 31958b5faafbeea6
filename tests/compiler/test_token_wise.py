"""Token-wise modules (autosp/passes/token_wise.py): transformers' mixture-of-experts layers as
their configs make them, and modules registered by class name, run on each rank's tokens; exact
against one device, what they hand out checked, a wrong registration caught by the verifier."""
import pytest
import torch
import transformers

import autosp
from autosp.passes import token_wise
from autosp_verify import verify

from .test_default_configs import VOCAB, causal_inputs
from .token_wise_models import LeakyCount, MixingMLP, SortedMLP, TokenWiseLM, inputs_fn

TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, attn_implementation="sdpa")
MOE = {  # config class prefix: its own names for experts; float32: transformers' grouped_mm takes no float64
    "Mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "DeepseekV3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_group=1,
                       topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
                       qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4),  # MLA's keys: copy_
    "Qwen3Moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
    "Olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "Glm4Moe": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=1,
                    head_dim=8),  # the router scatters along the experts
}
DEFAULT_RUN = {"Mixtral", "DeepseekV3"}  # the rest under `make test-all`


@pytest.mark.parametrize("family", [f if f in DEFAULT_RUN else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(MOE)])
def test_hf_mixture_of_experts_is_exact(family):
    config = getattr(transformers, f"{family}Config")(**TINY, **MOE[family])
    model_class = getattr(transformers, f"{family}ForCausalLM")
    before = autosp.COUNTERS["token_wise_modules"]
    result = verify(lambda: model_class(config).train(), causal_inputs, impl="autosp-eager", dtype=torch.float32,
                    world_size=2, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert autosp.COUNTERS["token_wise_modules"] > before


def _padded(batch, seq_len, generator):
    inputs = causal_inputs(batch, seq_len, generator)
    inputs["attention_mask"] = torch.ones(batch, seq_len, dtype=torch.long)
    inputs["attention_mask"][0, -3:] = 0  # right padding on the first row
    return inputs


def _router_loss_case(family="Mixtral", inputs=causal_inputs):
    """``output_router_logits=True``: HF adds its load-balancing loss, which counts each expert's
    tokens over the whole sequence (``histc``; with a padding mask, ``scatter_add`` of the mask),
    and returns every layer's router logits ([B * S, experts])."""
    config = getattr(transformers, f"{family}Config")(**TINY, **MOE[family], output_router_logits=True)
    model_class = getattr(transformers, f"{family}ForCausalLM")
    return verify(lambda: model_class(config).train(), inputs, impl="autosp-eager", dtype=torch.float32,
                  world_size=2, seq_len=13)


@pytest.mark.parametrize("inputs", [causal_inputs, _padded], ids=["histc", "padding-mask"])
def test_the_load_balancing_loss_counts_every_ranks_tokens_once(inputs):
    before = {k: autosp.COUNTERS[k] for k in ("seq_histc", "seq_scatter_add")}
    result = _router_loss_case(inputs=inputs)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert "aux_loss" in {t["name"] for t in result.tensors}  # compared, as are the router logits
    counted = "seq_histc" if inputs is causal_inputs else "seq_scatter_add"
    assert autosp.COUNTERS[counted] > before[counted]


def test_negative_control_each_ranks_own_expert_counts_fail(monkeypatch):
    """The tokens per expert counted on each rank's chunk alone (no sum over the group)."""
    from autosp.passes import loss

    def own_counts(ctx, node):
        node.meta.pop("autosp_rule")
    monkeypatch.setattr(loss, "_seq_histc", own_counts)
    torch._dynamo.reset()  # compiled again, through the broken pass
    try:
        assert _router_loss_case().status == "fail"
    finally:
        torch._dynamo.reset()


@pytest.fixture
def registered():
    names = []

    def register(cls):
        autosp.register_token_wise(cls.__name__)
        names.append(cls.__name__)
    torch._dynamo.reset()  # graphs compiled before (or after) the registration are not reused
    yield register
    token_wise.REGISTERED.difference_update(names)
    torch._dynamo.reset()


def _verify(block):
    return verify(lambda: TokenWiseLM(block), inputs_fn, impl="autosp-eager", dtype=torch.float64, world_size=2,
                  seq_len=13)


def test_a_module_token_wise_as_a_whole_is_refused_op_by_op_and_exact_once_registered(registered):
    refused = _verify(SortedMLP)
    assert refused.status == "unsupported" and "argsort" in refused.error, (refused.status, refused.error)
    registered(SortedMLP)
    result = _verify(SortedMLP)
    assert result.passed, (result.status, result.error, result.failures[:5])


def test_a_count_over_this_ranks_tokens_may_not_leave_the_module(registered):
    registered(LeakyCount)
    result = _verify(LeakyCount)
    assert result.status == "unsupported", (result.status, result.error)
    assert "token-wise module" in result.error and "differs from rank to rank" in result.error, result.error


def test_negative_control_a_module_registered_wrongly_is_caught_by_the_verifier(registered):
    """A cumulative sum over the tokens registered as token-wise: each rank sums its own tokens."""
    registered(MixingMLP)
    assert _verify(MixingMLP).status == "fail"


def test_negative_control_sizes_inside_left_whole_are_caught(registered, monkeypatch):
    """``arange(num_tokens)`` inside the module counting every token, not this rank's: not exact."""
    from types import SimpleNamespace

    from autosp.passes import sizes
    monkeypatch.setattr(sizes, "token_wise", SimpleNamespace(RULE="not localized"))
    registered(SortedMLP)
    result = _verify(SortedMLP)
    assert not result.passed and result.status in ("fail", "error"), (result.status, result.error)


def test_register_token_wise_takes_a_class_name():
    with pytest.raises(autosp.AutoSPError, match="takes a class name"):
        autosp.register_token_wise(SortedMLP)
