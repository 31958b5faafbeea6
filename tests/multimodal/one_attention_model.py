"""One ViT attention (HF ViTAttention-like, SDPA) after a patch embedding with a class token;
the loss reads the class token and pools over patches (sequence mixing outside attention)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), heads

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(6, 16)
        self.cls = nn.Parameter(torch.randn(1, 1, 16))
        self.attn = Attention()
        self.head = nn.Linear(16, 3)

    def embed(self, x):
        return torch.cat([self.cls.expand(x.shape[0], 1, 16), self.patch(x)], 1)

    def loss(self, hidden, labels):
        logits = self.head(hidden[:, 0] + hidden[:, 1:].mean(1))
        return F.cross_entropy(logits, labels)

    def forward(self, x, labels):
        return {"loss": self.loss(self.attn(self.embed(x)), labels)}


def model_fn():
    return Model()


def inputs_fn(batch, seq_len, generator):
    if seq_len < 2:
        raise ValueError("seq_len counts the class token: need >= 2")
    return {"x": torch.randn(batch, seq_len - 1, 6, generator=generator),
            "labels": torch.randint(0, 3, (batch,), generator=generator)}
