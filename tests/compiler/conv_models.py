"""Models that mix positions along the sequence by a convolution or a shift: ``ConvLM(mixer)``, 2
blocks of a sequence mixer and an MLP over 16-wide hidden states. The mixers as models write them:
a causal conv padded on both sides with its tail cut off (LFM2, Mamba), pad-then-conv, "same"
convs, RWKV's token shift; and ways autosp must refuse."""
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, HIDDEN = 64, 16


class CausalConv(nn.Module):
    """Depthwise, padded on both sides, the tail cut off (LFM2's short conv, Mamba's)."""

    def __init__(self, kernel=3, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(HIDDEN, HIDDEN, kernel, padding=dilation * (kernel - 1), dilation=dilation,
                              groups=HIDDEN)

    def forward(self, x):
        return self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)


class LeftPadConv(nn.Module):
    """Causal by an explicit F.pad before an unpadded conv."""

    def __init__(self, kernel=4):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(HIDDEN, HIDDEN, kernel)

    def forward(self, x):
        return self.conv(F.pad(x.transpose(1, 2), (self.kernel - 1, 0))).transpose(1, 2)


class SameConv(nn.Module):
    """``padding="same"``: an even kernel reads one more position after than before."""

    def __init__(self, kernel=4, dilation=1):
        super().__init__()
        self.conv = nn.Conv1d(HIDDEN, HIDDEN, kernel, padding="same", dilation=dilation)

    def forward(self, x):
        return self.conv(x.transpose(1, 2)).transpose(1, 2)


class TokenShift(nn.Module):
    """RWKV's time shift: position i mixes x[i] with x[i - shift]."""

    def __init__(self, shift=1):
        super().__init__()
        self.shift = shift
        self.mix = nn.Parameter(torch.rand(HIDDEN))
        self.out = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        previous = F.pad(x, (0, 0, self.shift, -self.shift))
        return self.out(x * self.mix + previous * (1 - self.mix))


class LookAhead(nn.Module):
    """x[i + 2] beside x[i]: a negative pad first (positions cut off), zeros after."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(2 * HIDDEN, HIDDEN)

    def forward(self, x):
        return self.out(torch.cat([x, F.pad(x, (0, 0, -2, 2))], -1))


class StridedConv(CausalConv):
    """Stride 2 along the sequence: a rank's outputs are not its positions'."""

    def forward(self, x):
        y = F.conv1d(x.transpose(1, 2), self.conv.weight, stride=2, padding=2, groups=HIDDEN)
        return y.repeat_interleave(2, -1)[..., :x.shape[1]].transpose(1, 2)


class ReflectPad(CausalConv):
    """Reflected positions before the sequence: not zeros."""

    def forward(self, x):
        y = F.pad(x.transpose(1, 2), (2, 0), mode="reflect")
        return F.conv1d(y, self.conv.weight, groups=HIDDEN).transpose(1, 2)


class PadReadPastTheEnd(nn.Module):
    """Zeros after the sequence, then the first position dropped: reads past the end."""

    def forward(self, x):
        return F.pad(x, (0, 0, 0, 1))[:, 1:]


class ConvLM(nn.Module):
    def __init__(self, mixer, **kwargs):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.mixers = nn.ModuleList([mixer(**kwargs), mixer(**kwargs)])
        self.mlps = nn.ModuleList([nn.Sequential(nn.Linear(HIDDEN, 32), nn.GELU(), nn.Linear(32, HIDDEN))
                                   for _ in range(2)])
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        for mix, mlp in zip(self.mixers, self.mlps):
            h = h + mix(F.silu(h))
            h = h + mlp(h)
        logits = self.head(h)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
