"""HF ``Gemma3ForCausalLM`` (text) from a tiny config, as ``from_pretrained`` gives it
(``use_cache=True``): its RMSNorms compute in float32 whatever the model's dtype
(``self.weight.float()``), and its layers attend through a sliding window (5 keys here)."""
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

VOCAB = 80


def model_fn():
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, intermediate_size=64, max_position_embeddings=512,
                              sliding_window=5, attn_implementation="sdpa")
    return Gemma3ForCausalLM(config).float().train()


def inputs_fn(batch, seq_len, generator):
    input_ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator, dtype=torch.int64)
    return {"input_ids": input_ids, "labels": input_ids.clone()}
