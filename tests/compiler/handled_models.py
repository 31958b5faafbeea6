"""Tiny models whose sequence-mixing ops AutoSP handles exactly (rather than refusing)."""
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN, HEADS = 32, 16, 4


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def hidden(self, input_ids):
        h = self.embed(input_ids)
        b, s, _ = h.shape
        q, k, v = (t.view(b, s, HEADS, -1).transpose(1, 2) for t in self.qkv(h).chunk(3, -1))
        return h + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)


class MeanPooledAuxLoss(Base):
    """The LM loss plus a term from the mean over the sequence (sum/mean become group sums)."""

    def forward(self, input_ids, labels):
        h = self.hidden(input_ids)
        logits = self.head(h)
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        lm = F.cross_entropy(logits.view(-1, VOCAB), shifted.reshape(-1))
        return {"loss": lm + h.mean(dim=1).pow(2).sum() + 0.1 * logits.sum() / logits.numel(), "logits": logits}


class SliceShiftedLoss(Base):
    """The pre-HF-5 shift: logits[:, :-1] against labels[:, 1:] (a tail slice of a sharded value)."""

    def forward(self, input_ids, labels):
        logits = self.head(self.hidden(input_ids))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="sum")
        return {"loss": loss / labels[:, 1:].numel(), "logits": logits}


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


class WeightedLoss(Base):
    """Class-weighted cross entropy: the mean divides by the summed weights of the valid targets."""

    def __init__(self):
        super().__init__()
        self.register_buffer("class_weight", torch.linspace(0.5, 2.0, VOCAB))

    def forward(self, input_ids, labels):
        logits = self.head(self.hidden(input_ids))
        shifted = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = F.cross_entropy(logits.view(-1, VOCAB), shifted.reshape(-1), weight=self.class_weight,
                               label_smoothing=0.1)
        return {"loss": loss, "logits": logits}
