"""One attention layer whose 2 kv heads are repeated for 4 query heads before SDPA, either as HF's
``repeat_kv`` does (each head n times in a row: grouped query heads) or tiled (the heads'
sequence n times: another grouping, which ``enable_gqa`` cannot express)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HEADS, KV, D = 32, 4, 2, 4


class Attn(nn.Module):
    def __init__(self, tiled):
        super().__init__()
        self.tiled = tiled
        self.emb, self.q = nn.Embedding(VOCAB, HEADS * D), nn.Linear(HEADS * D, HEADS * D)
        self.kv, self.head = nn.Linear(HEADS * D, 2 * KV * D), nn.Linear(HEADS * D, VOCAB)

    def forward(self, input_ids, labels):
        b, s = input_ids.shape
        x = self.emb(input_ids)
        q = self.q(x).view(b, s, HEADS, D).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 2 * KV, D).transpose(1, 2).chunk(2, dim=1)
        n = HEADS // KV
        if self.tiled:
            k, v = (t[:, None].expand(b, n, KV, s, D).reshape(b, HEADS, s, D) for t in (k, v))
        else:
            k, v = (t[:, :, None].expand(b, KV, n, s, D).reshape(b, HEADS, s, D) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        logits = self.head(a)
        return {"loss": F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten()), "logits": logits}


def grouped():
    return Attn(tiled=False)


def tiled():
    return Attn(tiled=True)


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
