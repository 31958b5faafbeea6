"""HF ``MistralForCausalLM`` with a sliding window of 5 keys (Mistral's transformers 5 config
default is 4096; shorter here so that sequences of a few tokens reach past it), as
``from_pretrained`` would give it (``use_cache=True``): HF builds a sliding-window causal mask
under torch.compile. 8 query / 2 kv heads of 16 (the attention output held once)."""
import torch
from transformers import MistralConfig, MistralForCausalLM

VOCAB, WINDOW = 80, 5


def model_fn():
    config = MistralConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=2, head_dim=16, intermediate_size=64, max_position_embeddings=512,
                           sliding_window=WINDOW, attn_implementation="sdpa")
    return MistralForCausalLM(config).float().train()


def inputs_fn(batch, seq_len, generator):
    input_ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator, dtype=torch.int64)
    return {"input_ids": input_ids, "labels": input_ids.clone()}
