"""A model drawing random numbers in its forward (dropout) cannot be compared exactly with one
device: the verifier refuses the case, naming the op, the model's line and the HF config fields,
instead of failing a correct implementation (autosp_verify/randomness.py)."""
import pytest
import torch
import torch.nn.functional as F
import transformers

from autosp_verify import verify
from autosp_verify.model_file import ModelFileError
from autosp_verify.randomness import RandomRecorder

VOCAB = 64


def _gpt_bigcode(**dropouts):
    """HF GPTBigCode as its config makes it: dropout 0.1 in three places."""
    config = transformers.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           attn_implementation="sdpa", **dropouts)
    return lambda: transformers.GPTBigCodeForCausalLM(config).float().train()


def _inputs(batch, seq_len, generator):
    ids = torch.randint(1, VOCAB, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


def test_a_model_with_dropout_is_refused_naming_the_op_the_line_and_the_config_fields():
    with pytest.raises(ModelFileError) as info:
        verify(_gpt_bigcode(), _inputs, impl="autosp-eager", dtype=torch.float64, world_size=2, seq_len=13)
    message = str(info.value)
    for part in ("draws random numbers", "bernoulli_", "modeling_gpt_bigcode.py", "resid_pdrop=0.1",
                 "attn_pdrop=0.1", "embd_pdrop=0.1"):
        assert part in message, message


def test_control_the_same_model_without_dropout_is_judged():
    """Exact (tests/compiler/test_default_configs.py runs it too); with one dropout left on, refused."""
    off = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    result = verify(_gpt_bigcode(**off), _inputs, impl="autosp-eager", dtype=torch.float64, world_size=2, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:3])
    with pytest.raises(ModelFileError, match="attn_pdrop=0.1"):
        verify(_gpt_bigcode(**{**off, "attn_pdrop": 0.1}), _inputs, impl="autosp-eager", dtype=torch.float64,
               world_size=2, seq_len=13)


def test_only_draws_are_recorded():
    x, q = torch.randn(2, 3), torch.randn(1, 2, 4, 8)
    with RandomRecorder() as quiet:
        F.dropout(x, 0.0, training=True), F.dropout(x, 0.1, training=False)
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.0)
    assert quiet.draws == []
    with RandomRecorder() as drawing:
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
        F.dropout(x, 0.1, training=True)
    assert [op for op, _ in drawing.draws] == ["bernoulli_", "bernoulli_"]
    assert all("test_randomness.py" in line for _, line in drawing.draws), drawing.draws
