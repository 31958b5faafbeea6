"""A model file whose attention mask cannot be made O(S): it is an [B, S, S] mask the caller
passes, AND-ed with a window the model computes with ``torch.cdist`` (no rule rebuilds that per
block). Every rank holds both whole; the accounting must say so."""
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB = 16


class SquareMaskLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.qkv, self.head = nn.Embedding(VOCAB, 8), nn.Linear(8, 24), nn.Linear(8, VOCAB)

    def forward(self, input_ids, labels, attention_mask):
        x = self.embed(input_ids)
        positions = torch.arange(x.shape[1], dtype=x.dtype)[None, :, None].expand(x.shape[0], -1, 1)
        window = torch.cdist(positions, positions) < 5
        q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 4).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=(attention_mask.bool() & window)[:, None])
        logits = self.head(a.transpose(1, 2).reshape(x.shape))
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def model_fn():
    return SquareMaskLM()


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    keep = torch.rand(batch, seq_len, seq_len, generator=generator) < 0.7
    return {"input_ids": ids, "labels": ids, "attention_mask": keep | torch.eye(seq_len, dtype=torch.bool)}
