"""Impls that break only on the last rank, for the fake simulator's structural checks at P=64.

On the fake process group every collective "succeeds" whatever the other ranks do, so these run
to the end; only comparing what the ranks issued (or the shapes they hand back) catches them.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autosp
from autosp import collectives


def _autosp_step(model, group, after):
    """autosp's rewrite (eager inner backend), then ``after(rank, last)`` outside the graph."""
    compiled = autosp.compile(model, group=group, backend="eager")

    def step(**batch):
        out = compiled(**batch)
        rank = dist.get_rank(group)
        after(rank, rank == dist.get_world_size(group) - 1)
        return out
    return step


def extra_collective_on_last_rank(model, group):
    """The last rank alone all-reduces a token count: on real hardware it waits for ever."""
    def after(rank, last):
        if last:
            collectives.group_sum(torch.ones(()), collectives.group_key(group))
    return _autosp_step(model, group, after)


def other_shape_on_last_rank(model, group):
    """Every rank all-reduces one more tensor, the last rank one of another shape."""
    def after(rank, last):
        collectives.group_sum(torch.ones(2 if last else 1), collectives.group_key(group))
    return _autosp_step(model, group, after)


class _RowNorm(nn.Module):
    """LayerNorm keeping its weight as a [1, H] row (a flat-parameter layout): the same numbers,
    a gradient of another shape than the single-device parameter's."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone().unsqueeze(0))
        self.bias = nn.Parameter(norm.bias.detach().clone())

    def forward(self, x):
        return F.layer_norm(x, self.shape, self.weight.squeeze(0), self.bias, self.eps)


def grad_shape_on_last_rank(model, group):
    """Every rank runs the whole model (no collective needed); the last rank's final norm keeps its
    weight as [1, H], so that rank's gradient for ``norm.weight`` has the wrong shape."""
    if dist.get_rank(group) == dist.get_world_size(group) - 1:
        model.norm = _RowNorm(model.norm)
    return lambda **batch: model(**batch)
