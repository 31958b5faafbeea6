"""A tiny causal LM for the verifier's own tests, written as a model file (model_fn, inputs_fn).

Two pre-norm blocks, multi-head causal SDPA (4-D [B, N, S, D], the only form DeepSpeed's pass
recognises), learned positions looked up from position ids, and the HF-5 loss: labels shifted by
padding one -100 on the right, then a token mean of cross entropy.
"""
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, HEADS, LAYERS, MAX_POS = 32, 16, 4, 2, 128


def shift_labels(labels):
    """HF-5 style: the target of token t is labels[t + 1]; the last token has none."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)

    def core(self, q, k, v):
        # An impl may replace `core` on an instance to wrap attention (see ulysses_impls.py).
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def forward(self, x):
        b, s, h = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        o = self.core(q, k, v)
        return self.out(o.transpose(1, 2).reshape(b, s, h))


class Block(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, hidden=HIDDEN, heads=HEADS):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.pos = nn.Embedding(MAX_POS, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        x = self.embed(input_ids) + self.pos(position_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), shift_labels(labels).flatten(), ignore_index=-100)
        return out


def model_fn():
    return TinyLM()


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    labels = ids.clone()
    # A few ignored labels so per-rank valid-token counts differ (catches per-rank means).
    labels[:, : seq_len // 3] = -100
    positions = torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len).contiguous()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
