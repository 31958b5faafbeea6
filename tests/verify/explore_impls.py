"""Ulysses impls of tiny_model.TinyLM that take ANY sequence length, for the exploration tests.

``padded`` pads the sequence up to a multiple of P (pad tokens at the end, which causal
attention keeps away from the real ones), shards it, and trims each rank's logits back to its
real tokens. ``padded_labels_zero`` is the same with a one-token bug that is easy to write and
hard to see: it pads the labels with ``F.pad``'s default value 0 -- a real token id -- instead
of -100, so the padded positions count in the loss. It is exact whenever P divides S (nothing to
pad), and wrong at every length P does not divide: the bug ``--explore`` must find and shrink.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autosp_verify.impls import resolve_impl

_ULYSSES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ulysses_impls.py")


def _ulysses_parts():
    """The attention all-to-all, the loss reduction and the label shift of the hand-written Ulysses
    impl, from ulysses_impls.py by path (this file is loaded by path too, so it has no package to
    import from). Looked up when the impl runs: the verifier's loader holds its lock while this
    file is imported."""
    return (resolve_impl(f"{_ULYSSES}:{name}") for name in ("_ulysses_core", "SumIdentityBackward", "shift_labels"))


def make_padded(label_pad=-100):
    def impl(model, group):
        _ulysses_core, SumIdentityBackward, shift_labels = _ulysses_parts()
        for m in model.modules():
            if hasattr(m, "core"):
                m.core = lambda q, k, v: _ulysses_core(q, k, v, group)

        def step(input_ids, labels, position_ids=None, **_):
            p, rank = group.size(), dist.get_rank(group)
            b, s = input_ids.shape
            n = -(-s // p)  # tokens per rank after padding
            pad = n * p - s
            if position_ids is None:
                position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
            ids, positions = F.pad(input_ids, (0, pad)), F.pad(position_ids, (0, pad))
            if label_pad is None:  # the bug: F.pad's default pads with 0, a real token id
                targets = F.pad(shift_labels(labels), (0, pad))
            else:
                targets = F.pad(shift_labels(labels), (0, pad), value=label_pad)
            shard = slice(rank * n, (rank + 1) * n)
            logits = model(input_ids=ids[:, shard], position_ids=positions[:, shard])["logits"]
            flat = targets[:, shard].flatten()
            loss_sum = F.cross_entropy(logits.flatten(0, 1), flat, ignore_index=-100, reduction="sum")
            count = (flat != -100).sum().to(loss_sum.dtype)
            dist.all_reduce(count, group=group)
            real = max(0, min(s, (rank + 1) * n) - rank * n)  # this rank's tokens that are not padding
            return {"loss": SumIdentityBackward.apply(loss_sum, group) / count, "logits": logits[:, :real]}

        return step

    return impl


padded = make_padded()  # correct at every sequence length
padded_labels_zero = make_padded(label_pad=None)  # wrong exactly when P does not divide S
