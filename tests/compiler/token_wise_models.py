"""A tiny LM whose middle is token-wise as a whole but not op by op (for tests/compiler/test_token_wise.py).

``SortedMLP`` sorts the tokens by a score, runs a linear layer on them in that order and puts them
back, as transformers' experts do by expert; ``LeakyCount`` also hands a count over this rank's
tokens to the loss; ``MixingMLP`` claims to be token-wise and is not (a cumulative sum).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN = 32, 16


class SortedMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.score, self.mlp = nn.Linear(HIDDEN, 1), nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):  # [tokens, HIDDEN]
        order = self.score(x).squeeze(-1).argsort()
        y = self.mlp(x[order])
        back = torch.empty_like(order)
        back[order] = torch.arange(order.numel(), device=x.device)
        return y[back], None


class LeakyCount(SortedMLP):
    def forward(self, x):
        y, _ = super().forward(x)
        return y, torch.zeros(4, dtype=x.dtype).index_add(0, x.argmax(-1) % 4, torch.ones_like(x[:, 0]))


class MixingMLP(SortedMLP):
    def forward(self, x):
        return self.mlp(x).cumsum(0), None


class TokenWiseLM(nn.Module):
    def __init__(self, block: type):
        super().__init__()
        self.embed, self.block, self.head = nn.Embedding(VOCAB, HIDDEN), block(), nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        out, count = self.block(h.view(-1, HIDDEN))
        logits = self.head(h + out.view(h.shape))
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        loss = F.cross_entropy(logits.view(-1, VOCAB), labels.reshape(-1))
        return {"loss": loss if count is None else loss + count.sum() * 0, "logits": logits}


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
