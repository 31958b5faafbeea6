"""transformers ``Lfm2ForCausalLM`` from a tiny config (no download), as loaded; a model file
(``model_fn``, ``inputs_fn``) for tests/compiler/test_halo.py and the GPU tier, not a fixture (each
check compiles it twice: once to find the cache it cannot keep).

Exercises: a hybrid of short convolutions along the sequence (LFM2's gated depthwise conv of
kernel 3, padded on both sides and its tail cut off: each rank reads its neighbours' last
positions through ``autosp::halo``) and GQA attention (8 query heads, 2 kv heads, head_dim 4),
with the config's defaults: ``use_cache=True``, whose convolution cache keeps the last positions
(autosp builds none, with a warning, as for a sliding window).
"""
import torch
from transformers import Lfm2Config, Lfm2ForCausalLM

VOCAB = 128


def model_fn():
    config = Lfm2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2, layer_types=["conv", "full_attention"],
        attn_implementation="sdpa",
    )
    return Lfm2ForCausalLM(config).float().train()


def inputs_fn(batch, seq_len, generator):
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: need >= 2 for a valid target after the label shift")
    input_ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator, dtype=torch.int64)
    labels = input_ids.clone()
    ignore = torch.rand(batch, seq_len, generator=generator) < 0.2
    ignore[:, -1] = False  # every row keeps a valid target after the shift (seq_len >= 2)
    labels[ignore] = -100
    return {"input_ids": input_ids, "labels": labels}
