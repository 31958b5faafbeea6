"""A Llama-style causal LM whose architecture is a small config, for property tests.

Covers what the passes must get right: GQA through ``enable_gqa``, an explicit ``repeat_kv`` or one
kv head that SDPA broadcasts (multi-query), ``is_causal`` or an explicit mask built from a 2-D
padding mask, positions passed or built from ``arange`` inside the model, RoPE, RMSNorm, SwiGLU,
and the HF-5 shifted-label loss; or
bidirectional attention (no mask, or padding only); and a KV cache the forward builds but never
reads (``use_cache=True`` in a training forward); through SDPA, or written out (matmuls, a
masked_fill or an additive causal mask, softmax), as HF's eager kernels; and a short causal
convolution along the sequence before attention (LFM2's, Mamba's: padded on both sides, its tail
cut off), or zero-padded before it, or a "same" one in an encoder.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class LMConfig:
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 4
    layers: int = 1
    vocab: int = 32
    gqa_in_sdpa: bool = True  # False: repeat_kv before attention, as HF does
    kv_broadcast: bool = False  # with one kv head and not gqa_in_sdpa: SDPA broadcasts it (Falcon)
    explicit_mask: bool = False  # True: a [B, 1, S, S] boolean mask instead of is_causal
    causal: bool = True  # False: bidirectional (an encoder): is_causal=False, or a mask of padding only
    cache: bool = False  # True: keys and values concatenated onto an empty cache, as HF's DynamicCache
    written: bool = False  # True: attention written out (q @ k^T, mask, softmax, @ v), as HF's eager kernels
    conv: int = 0  # > 0: a depthwise convolution of this kernel along the sequence before attention
    conv_pad_first: bool = False  # the convolution's padding as an F.pad before it

    @property
    def hidden(self):
        return self.heads * self.head_dim


def _rope(x, positions):
    half = x.shape[-1] // 2
    freq = 1.0 / (10000 ** (torch.arange(half, dtype=x.dtype) / half))
    angle = positions[:, None, :, None].to(x.dtype) * freq
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1)


class Block(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.c = c
        self.norm1, self.norm2 = nn.RMSNorm(c.hidden), nn.RMSNorm(c.hidden)
        self.q = nn.Linear(c.hidden, c.heads * c.head_dim, bias=False)
        self.kv = nn.Linear(c.hidden, 2 * c.kv_heads * c.head_dim, bias=False)
        self.o = nn.Linear(c.heads * c.head_dim, c.hidden, bias=False)
        self.gate_up = nn.Linear(c.hidden, 4 * c.hidden, bias=False)
        self.down = nn.Linear(2 * c.hidden, c.hidden, bias=False)
        if c.conv:
            self.conv = nn.Conv1d(c.hidden, c.hidden, c.conv, groups=c.hidden)

    def mix(self, h):
        """The convolution along the sequence: causal (its tail cut off) or, in an encoder, "same"."""
        c, S, w = self.c, h.shape[1], self.conv.weight
        h = h.transpose(1, 2)
        if c.conv_pad_first:
            before = c.conv - 1 if c.causal else (c.conv - 1) // 2
            y = F.conv1d(F.pad(h, (before, c.conv - 1 - before)), w, self.conv.bias, groups=c.hidden)
        elif c.causal:
            y = F.conv1d(h, w, self.conv.bias, padding=c.conv - 1, groups=c.hidden)[..., :S]
        else:
            y = F.conv1d(h, w, self.conv.bias, padding="same", groups=c.hidden)
        return y.transpose(1, 2)

    def forward(self, x, positions, mask):
        c, (B, S, _) = self.c, x.shape
        h = self.norm1(x)
        if c.conv:
            h = h + self.mix(h)
        q = self.q(h).view(B, S, c.heads, c.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(B, S, 2 * c.kv_heads, c.head_dim).transpose(1, 2).chunk(2, dim=1)
        q, k = _rope(q, positions), _rope(k, positions)
        if c.cache:  # DynamicCache.update on a fresh cache: torch.cat([empty, new], dim=-2)
            k, v = (torch.cat([t.new_empty(B, c.kv_heads, 0, c.head_dim), t], dim=-2) for t in (k, v))
        gqa = c.heads != c.kv_heads
        if gqa and (c.written or not c.gqa_in_sdpa) and not (c.kv_heads == 1 and c.kv_broadcast):
            rep = c.heads // c.kv_heads
            k = k[:, :, None].expand(B, c.kv_heads, rep, S, c.head_dim).reshape(B, c.heads, S, c.head_dim)
            v = v[:, :, None].expand(B, c.kv_heads, rep, S, c.head_dim).reshape(B, c.heads, S, c.head_dim)
        if c.written:  # one kv head with kv_broadcast: the matmul broadcasts it
            scores = q @ k.transpose(-2, -1) / c.head_dim ** 0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            elif c.causal:
                scores = scores + torch.full((S, S), float("-inf")).triu(1)
            a = scores.softmax(dim=-1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and c.causal,
                                               enable_gqa=gqa and c.gqa_in_sdpa)
        x = x + self.o(a.transpose(1, 2).reshape(B, S, -1))
        gate, up = self.gate_up(self.norm2(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class ConfigurableLM(nn.Module):
    def __init__(self, c: LMConfig):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab, c.hidden)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.hidden)
        self.head = nn.Linear(c.hidden, c.vocab, bias=False)

    def forward(self, input_ids, labels, position_ids=None, attention_mask=None):
        B, S = input_ids.shape
        positions = position_ids if position_ids is not None else torch.arange(S).expand(B, S)
        mask = None
        if self.c.explicit_mask or attention_mask is not None:
            idx = torch.arange(S)
            visible = idx[None, :] <= idx[:, None] if self.c.causal else idx[None, :] >= 0
            mask = visible[None, None].expand(B, 1, S, S)
            if attention_mask is not None:
                mask = mask & attention_mask.bool()[:, None, None, :]
                mask = mask | torch.eye(S, dtype=torch.bool)  # every query sees itself: no empty row
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x, positions, mask)
        logits = self.head(self.norm(x))
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = F.cross_entropy(logits.view(-1, self.c.vocab), shifted.reshape(-1), ignore_index=-100)
        return {"loss": loss, "logits": logits}
