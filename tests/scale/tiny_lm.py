"""A tiny HF Llama for the scale simulator's tests: narrow (so S of a few thousand is cheap) and
shaped so that no one part dominates the peak: a small vocabulary (the loss's float32 logits
stay small), 8 query / 2 key-value heads of width 8. Two layers unless asked (the tests that
need saved activations to add up ask for more)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 32
LAYERS = 2


def model_fn(layers: int = LAYERS, intermediate: int = 128):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=2, intermediate_size=intermediate, max_position_embeddings=1 << 20,
                         attention_dropout=0.0, use_cache=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config).train()


def inputs_fn(batch, seq_len, generator):
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len}: need >= 2")
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator, dtype=torch.int64)
    # a token in the middle is masked out: the later rows see two ranges of keys, so autosp's
    # attention runs its blocks (a mask of runs, causal or padded at an end, takes torch's fused
    # kernel, which the simulator counts as blocks: an upper bound)
    attention_mask = torch.ones_like(ids)
    attention_mask[:, seq_len // 2] = 0
    labels = ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": ids, "labels": labels, "attention_mask": attention_mask}
