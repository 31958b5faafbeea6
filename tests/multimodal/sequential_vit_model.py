"""A timm-style ViT: blocks held in an ``nn.Sequential`` (not a ModuleList), a class token and
learned positions, pre-norm blocks, mean pooling and a classifier outside the blocks."""
import torch
import torch.nn as nn
import torch.nn.functional as F

DIM, HEADS, PATCH = 16, 4, 6


class Attention(nn.Module):
    autosp_attention = "vision"  # declared, not registered by name

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(DIM), Attention()
        self.norm2, self.mlp = nn.LayerNorm(DIM), nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(),
                                                                 nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, max_len=64):
        super().__init__()
        self.patch_embed = nn.Linear(PATCH, DIM)
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, max_len, DIM) * 0.02)
        self.blocks = nn.Sequential(Block(), Block())
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 3)

    def forward(self, patches, labels):
        x = torch.cat([self.cls_token.expand(patches.shape[0], 1, DIM), self.patch_embed(patches)], 1)
        x = self.blocks(x + self.pos_embed[:, :x.shape[1]])
        logits = self.head(self.norm(x).mean(1))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def model_fn():
    return ViT()


def inputs_fn(batch, seq_len, generator):
    if seq_len < 2:
        raise ValueError("seq_len counts the class token: need >= 2")
    return {"patches": torch.randn(batch, seq_len - 1, PATCH, generator=generator),
            "labels": torch.randint(0, 3, (batch,), generator=generator)}
