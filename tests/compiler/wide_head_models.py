"""HF ``LlamaForCausalLM`` with head_dim 16 (hidden 128, 8 query / 4 kv heads, 2 layers), as
``from_pretrained`` would give it (``use_cache=True``): heads wide enough that
``SPConfig(attention_output="auto")`` holds the attention output once. ``inputs_fn``: causal
(torch's CPU flash kernel); ``padded_inputs_fn``: right padding (``autosp::masked_attention``)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 96, 2, 8, 4, 16


def model_fn():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=128,
                         max_position_embeddings=512, attn_implementation="sdpa")
    return LlamaForCausalLM(config).float().train()


def inputs_fn(batch, seq_len, generator):
    input_ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator, dtype=torch.int64)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def padded_inputs_fn(batch, seq_len, generator):
    batch_inputs = inputs_fn(batch, seq_len, generator)
    lengths = torch.randint(2, seq_len + 1, (batch,), generator=generator)
    lengths[0] = 2 + seq_len // 2  # the first row always has padding
    attention_mask = (torch.arange(seq_len) < lengths[:, None]).long()
    batch_inputs["labels"] = batch_inputs["labels"].masked_fill(attention_mask == 0, -100)
    return {**batch_inputs, "attention_mask": attention_mask}
