"""Attention written out (no SDPA) in the ways hand-written models and HF's eager kernels write it,
and ways autosp must refuse. ``WrittenLM(Attention)``: 2 pre-norm blocks, 8 query heads of 4."""
import math

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN, HEADS, KV_HEADS, MAX_POS = 64, 32, 8, 2, 128
HEAD_DIM = HIDDEN // HEADS


class Attention(nn.Module):
    """nanoGPT: a causal [MAX, MAX] buffer cut to the length, masked_fill, softmax, @ v."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.register_buffer("bias", torch.tril(torch.ones(MAX_POS, MAX_POS)).view(1, 1, MAX_POS, MAX_POS))

    def heads(self, x):
        B, T, C = x.size()
        q, k, v = self.qkv(x).split(HIDDEN, dim=2)
        return [t.view(B, T, HEADS, HEAD_DIM).transpose(1, 2) for t in (q, k, v)]

    def weights(self, q, k, T):
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        return F.softmax(att, dim=-1)

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.heads(x)
        y = self.weights(q, k, T) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class GroupedSoftcapSinks(nn.Module):
    """HF-style: 8 query / 2 kv heads repeated by ``repeat_kv`` before the matmul, a tanh softcap
    (Gemma 2), a learned sink logit per head concatenated to the scores (GPT-OSS), the row max
    subtracted, the sink column dropped after the softmax."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM)
        self.kv = nn.Linear(HIDDEN, 2 * KV_HEADS * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN)
        self.sinks = nn.Parameter(torch.randn(HEADS) * 0.5)

    @staticmethod
    def repeat_kv(x, n):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n, s, d).reshape(b, h * n, s, d)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2)
        k, v = (t.view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2) for t in self.kv(x).chunk(2, dim=-1))
        k, v = self.repeat_kv(k, HEADS // KV_HEADS), self.repeat_kv(v, HEADS // KV_HEADS)
        scores = torch.matmul(q, k.transpose(2, 3)) / HEAD_DIM ** 0.5
        scores = torch.tanh(scores / 5.0) * 5.0
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, T, 1)
        scores = torch.cat([scores, sinks], dim=-1)
        scores = scores - scores.max(dim=-1, keepdim=True).values
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)[..., :-1]
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, -1)
        return self.o(out)


class Alibi(Attention):
    """A per-head linear bias from the positions (ALiBi): a [1, H, S, S] value built from the
    inputs, every rank using its own heads of it; bidirectional (no mask)."""

    def weights(self, q, k, T):
        pos = torch.arange(T, device=q.device)
        slopes = 2.0 ** (-torch.arange(1, HEADS + 1, device=q.device, dtype=q.dtype))
        bias = -(pos[None, :] - pos[:, None]).abs().to(q.dtype) * slopes[:, None, None]
        return F.softmax(q @ k.transpose(-2, -1) / math.sqrt(HEAD_DIM) + bias[None], dim=-1)


class Einsum(Attention):
    """``einsum("bhid,bhjd->bhij")``, a causal mask made in forward, ``einsum("bhij,bhjd->bhid")``."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.heads(x)
        scores = torch.einsum("bhid,bhjd->bhij", q, k) * HEAD_DIM ** -0.5
        scores = scores + torch.triu(torch.full((T, T), float("-inf"), device=x.device), diagonal=1)
        y = torch.einsum("bhij,bhjd->bhid", scores.softmax(dim=-1), v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class EinsumSequenceFirst(Attention):
    """q, k, v kept [B, S, H, D] (never transposed): ``einsum("bqhd,bkhd->bhqk")`` and back."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = (t.view(B, T, HEADS, HEAD_DIM) for t in self.qkv(x).split(HIDDEN, dim=2))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM)
        scores = scores.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        y = torch.einsum("bhqk,bkhd->bqhd", F.softmax(scores, dim=-1), v)
        return self.proj(y.reshape(B, T, C))


class ReturnsWeights(Attention):
    """The attention weights handed out (``output_attentions=True``): refused."""

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.heads(x)
        w = self.weights(q, k, T)
        return self.proj((w @ v).transpose(1, 2).contiguous().view(B, T, C)), w


class MixesHeads(Attention):
    """Scores mixed across heads before the softmax (talking heads): refused."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Parameter(torch.eye(HEADS) + 0.1)

    def weights(self, q, k, T):
        att = (q @ k.transpose(-2, -1)) / math.sqrt(HEAD_DIM)
        att = torch.einsum("bhqk,gh->bgqk", att, self.mix)
        return F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)


class ChunkBias(Attention):
    """A bias computed from the activations (one per query), added to the scores: refused."""

    def weights(self, q, k, T):
        att = (q @ k.transpose(-2, -1)) / math.sqrt(HEAD_DIM) + q.sum(-1, keepdim=True)
        return F.softmax(att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf")), dim=-1)


class Differential(Attention):
    """Two attention weights subtracted (differential attention): refused."""

    def weights(self, q, k, T):
        first = F.softmax(super().weights(q, k, T), dim=-1)
        return first - 0.5 * super().weights(q * 2, k, T)


class Block(nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.attn = attention()
        self.mlp = nn.Sequential(nn.Linear(HIDDEN, 2 * HIDDEN), nn.GELU(), nn.Linear(2 * HIDDEN, HIDDEN))


class WrittenLM(nn.Module):
    def __init__(self, attention=Attention):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(MAX_POS, HIDDEN)
        self.blocks = nn.ModuleList(Block(attention) for _ in range(2))
        self.ln_f = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, input_ids, labels):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)
        weights = []
        for block in self.blocks:
            a = block.attn(block.ln1(x))
            if isinstance(a, tuple):
                a, w = a
                weights.append(w)
            x = x + a
            x = x + block.mlp(block.ln2(x))
        logits = self.head(self.ln_f(x))
        shift = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = F.cross_entropy(logits.flatten(0, 1), shift.flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits, **({"attentions": weights} if weights else {})}


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
