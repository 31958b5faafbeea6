"""Tiny causal LMs, each with one op that mixes values along the sequence (for soundness tests).

``make(kind)`` builds the model; ``inputs_fn`` the batch. The op sits between the embedding and
the LM head, so its input is a sharded activation.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, HIDDEN, HEADS = 32, 16, 4


def _cumsum(h):
    return h.cumsum(1)


def _last_token(h):
    return h + h[:, -1:]


def _conv(h, conv):
    return conv(h.transpose(1, 2)).transpose(1, 2)


def _eager_attention(h):
    b, s, _ = h.shape
    q = h.view(b, s, HEADS, -1).transpose(1, 2)
    scores = q @ q.transpose(-1, -2)
    return (scores.softmax(-1) @ q).transpose(1, 2).reshape(b, s, -1)


def _sort(h):
    return h.sort(dim=1).values


def _flip(h):
    return h.flip(1)


def _gather(h):
    index = torch.zeros_like(h, dtype=torch.long)
    return torch.gather(h, 1, index)


def _roll(h):
    return torch.roll(h, 1, dims=1)


def _sdpa(h):
    """Positional apart from attention itself: the control that compiles."""
    b, s, _ = h.shape
    q = h.view(b, s, HEADS, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    return out.transpose(1, 2).reshape(b, s, -1)


def _group_norm(h):
    return F.group_norm(h, 1)  # [B, S, H] with one group: statistics over S and H together


def _min_over_seq(h):
    return h + h.min(dim=1, keepdim=True).values  # a tuple (values, indices), neither along the sequence


def _addmm_over_seq(h):
    return h + torch.addmm(h.new_zeros(HIDDEN), h[0].t(), h[0]).sum()  # [H, S] @ [S, H]: contracts S


def _histogram_over_its_own_range(h):
    return h + torch.histc(h[..., 0], bins=4).sum()  # min == max: the range of the values each rank holds


def _repeat_along_seq(h):
    return h + h.repeat(1, 2, 1)[:, 1::2]  # two copies end to end, every other position: mixes them


MIXERS = {"group_norm": _group_norm, "cumsum": _cumsum, "last_token": _last_token, "conv1d": _conv,
          "eager_attention": _eager_attention, "sort": _sort, "flip": _flip, "gather": _gather,
          "roll": _roll, "min_over_seq": _min_over_seq, "addmm_over_seq": _addmm_over_seq,
          "repeat_along_seq": _repeat_along_seq, "histc_own_range": _histogram_over_its_own_range}


def _sdpa_dropout(h):
    """Attention with dropout: fine under Ulysses, refused once keys and values are gathered."""
    b, s, _ = h.shape
    q = h.view(b, s, HEADS, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, q, q, is_causal=True, dropout_p=0.1)
    return out.transpose(1, 2).reshape(b, s, -1)


def _checkpointed_sdpa(h):
    """Attention inside torch.utils.checkpoint (inlined, then recomputed in the backward)."""
    return torch.utils.checkpoint.checkpoint(_sdpa, h, use_reentrant=False)


def _checkpointed_with_policy(h):
    """torch.utils.checkpoint with a selective policy of its own (context_fn): refused."""
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
    policy = partial(create_selective_checkpoint_contexts, lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE)
    return torch.utils.checkpoint.checkpoint(_sdpa, h, use_reentrant=False, context_fn=policy)


def _nested_checkpoints(h):
    """A checkpoint region inside another: refused."""
    return torch.utils.checkpoint.checkpoint(_checkpointed_sdpa, h, use_reentrant=False)


def _max_of_two(h):
    """max/min of two tensors: elementwise (Apertus' xIELU: ``torch.min(x, self.eps)``); so are
    torch's aliases (Gemma 3n: ``torch.multiply``)."""
    return torch.multiply(torch.max(h, torch.zeros_like(h)), 2.0) + torch.subtract(h.min(h * 0.5), 1.0)


def _last_positions_of_a_longer_window(h):
    """The last 64 positions of a shorter sequence: all of them (HF's sliding-window cache keeps
    ``[-window + 1:]``, all of a sequence shorter than the window)."""
    return h[:, -64:] * 2


def _repeat_along_hidden(h):
    """``Tensor.repeat`` along other dims (DiffLlama tiles its value heads)."""
    return h.repeat(1, 1, 2)[..., :HIDDEN] + h


def _view_to_a_built_shape(h):
    """``input_shape + (H,)``: Dynamo builds a ``torch.Size`` node (GPTBigCode's last view)."""
    shape = h.shape
    return (h * 2).view(h.shape[:-1] + (HIDDEN,)).reshape(shape[:-1] + (HIDDEN,))  # and the chunk's own


POSITIONAL = {"sdpa": _sdpa, "sdpa_dropout": _sdpa_dropout, "checkpointed_sdpa": _checkpointed_sdpa,
              "checkpointed_with_policy": _checkpointed_with_policy, "nested_checkpoints": _nested_checkpoints,
              "max_of_two": _max_of_two, "window_longer": _last_positions_of_a_longer_window,
              "built_shape": _view_to_a_built_shape, "repeat_along_hidden": _repeat_along_hidden}


class MixingLM(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.conv = nn.Conv1d(HIDDEN, HIDDEN, 3, padding=1, padding_mode="circular")  # the first reads the last
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        mixer = {**MIXERS, **POSITIONAL}[self.kind]
        h = mixer(h, self.conv) if self.kind == "conv1d" else mixer(h)
        logits = self.head(h)
        labels = F.pad(labels, (0, 1), value=-100)[..., 1:]
        return {"loss": F.cross_entropy(logits.view(-1, VOCAB), labels.reshape(-1)), "logits": logits}


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, VOCAB, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
