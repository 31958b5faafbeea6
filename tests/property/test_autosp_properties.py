"""Property: for every architecture and shape drawn, autosp on P threaded ranks matches one device
(loss, logits, every gradient) within the per-dtype tolerance: causal or bidirectional, with or
without a mask, with or without a KV cache built in the forward, attention through SDPA or written
out, with or without a convolution along the sequence before it.

Values are built, not filtered: query heads are a multiple of the kv heads; P need not divide the
query heads (padded heads) nor the sequence length (padded sequence), and may exceed the query
heads (P = U x R: Ulysses over U ranks, keys and values gathered over R).
"""
import torch
from hypothesis import given
from hypothesis import strategies as st

import autosp_verify

from .configurable_lm import ConfigurableLM, LMConfig

VOCAB = 32


@st.composite
def cases(draw):
    world_size = draw(st.sampled_from([1, 2, 4, 8]))
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    heads = kv_heads * draw(st.integers(1, 4))
    config = LMConfig(heads=heads, kv_heads=kv_heads, head_dim=draw(st.sampled_from([2, 4])),
                      layers=draw(st.integers(1, 2)), vocab=VOCAB,
                      gqa_in_sdpa=draw(st.booleans()), kv_broadcast=draw(st.booleans()),
                      explicit_mask=draw(st.booleans()),
                      causal=draw(st.booleans()), cache=draw(st.booleans()), written=draw(st.booleans()),
                      conv=draw(st.sampled_from([0, 0, 2, 3, 5])), conv_pad_first=draw(st.booleans()))
    return dict(config=config, world_size=world_size, seq_len=draw(st.integers(2, 3 * world_size + 3)),
                batch=draw(st.integers(1, 3)), dtype=draw(st.sampled_from([torch.float64, torch.float32])),
                positions=draw(st.booleans()), padding_mask=draw(st.booleans()), seed=draw(st.integers(0, 3)))


def _inputs_fn(positions, padding_mask):
    def inputs_fn(batch, seq_len, generator):
        ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
        labels = ids.masked_fill(torch.rand(batch, seq_len, generator=generator) < 0.2, -100)
        labels[:, -1] = ids[:, -1]  # one target at least: an all-ignored loss is NaN on one device too
        batch_inputs = {"input_ids": ids, "labels": labels}
        if positions:
            batch_inputs["position_ids"] = torch.arange(seq_len).expand(batch, seq_len) + 5
        if padding_mask:
            mask = torch.ones(batch, seq_len, dtype=torch.long)
            mask[0, : seq_len // 3] = 0  # left padding on the first row
            batch_inputs["attention_mask"] = mask
        return batch_inputs
    return inputs_fn


@given(cases())
def test_autosp_matches_one_device(case):
    result = autosp_verify.verify(
        lambda: ConfigurableLM(case["config"]), _inputs_fn(case["positions"], case["padding_mask"]),
        impl="autosp-eager", world_size=case["world_size"], seq_len=case["seq_len"], batch=case["batch"],
        dtype=case["dtype"], seed=case["seed"], steps=1)  # every example is another draw already
    assert result.passed, (case, result.status, result.error, result.failures[:5])
