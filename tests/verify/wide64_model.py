"""A model file with 64 query heads of width 2, so a Ulysses split over up to 64 ranks is possible:
the fake simulator's structural runs at P=64. Tiny everywhere else (hidden 128, one layer: the
compile dominates a fake run, and its cost grows with the layers), so a case takes seconds.

``model_fn``: multi-head attention (64 key/value heads). ``gqa_model_fn``: grouped-query
attention with 8 key/value heads (SDPA ``enable_gqa``): at P=64 every rank holds the one kv head
of its query head, replicated across the 8 ranks of its group. ``heads32_model_fn``: 32 query
heads of width 4 and 8 kv heads: at P=64, past the head count (Ulysses over 32, kv gathered over 2).
"""
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HEADS, HEAD_DIM, LAYERS, MAX_POS = 32, 64, 2, 1, 256
HIDDEN = HEADS * HEAD_DIM


class Attention(nn.Module):
    def __init__(self, kv_heads, heads=HEADS):
        super().__init__()
        self.kv_heads, self.heads, self.head_dim = kv_heads, heads, HIDDEN // heads
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.kv = nn.Linear(HIDDEN, 2 * kv_heads * self.head_dim)
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.out(o.transpose(1, 2).reshape(b, s, HIDDEN))


class Block(nn.Module):
    def __init__(self, kv_heads, heads=HEADS):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.attn = Attention(kv_heads, heads)
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class WideLM(nn.Module):
    def __init__(self, kv_heads=HEADS, heads=HEADS):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Embedding(MAX_POS, HIDDEN)
        self.blocks = nn.ModuleList(Block(kv_heads, heads) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, labels=None, position_ids=None):
        x = self.embed(input_ids) + self.pos(position_ids)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        out = {"logits": logits}
        if labels is not None:
            shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]  # HF-5: token t predicts labels[t + 1]
            out["loss"] = F.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100)
        return out


def model_fn():
    return WideLM()


def gqa_model_fn():
    return WideLM(kv_heads=8)


def heads32_model_fn():
    return WideLM(kv_heads=8, heads=32)


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, : seq_len // 3] = -100  # per-rank valid-token counts differ
    positions = torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len).contiguous()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
