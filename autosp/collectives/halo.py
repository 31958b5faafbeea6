"""``autosp::halo``: a rank's chunk with its neighbours' edge positions around it.

A convolution along the sequence (a causal short conv, as LFM2's; a "same" conv) reads, for its
output at position i, the inputs from i - left to i + right. A rank holding positions
[r*L, r*L + L) therefore needs the ``left`` positions before its chunk and the ``right`` after
it: this op returns ``[left + L + right]`` positions along ``dim``, positions before 0 or at or
past ``length`` (the value's own logical length: the end of the last chunk is padding) as zeros,
exactly the zeros the convolution's own padding would read on one device. The convolution then
runs with no padding of its own.

Each rank sends exactly the positions another rank reads (one all-to-all with split sizes:
nothing to the ranks that read none; the neighbours' neighbours too where a halo is longer than
a chunk). The backward sends each halo's gradient back to the ranks owning those positions, which
add it to their own.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from autosp.collectives.groups import check_device, count, resolve_group


class _Plan:
    """Which of its positions a rank sends to whom, and how many it receives from whom."""

    def __init__(self, rank: int, world_size: int, local_len: int, left: int, right: int):
        L, r = local_len, rank
        self.rank, self.local_len = rank, local_len
        self.sends: dict[int, tuple[int, int]] = {}  # peer -> (first, end) offsets in this chunk
        self.receives: dict[int, int] = {}  # peer -> positions from it
        reach = lambda n, q: max(0, min(L, n - (abs(q - r) - 1) * L))  # noqa: E731  (positions of a chunk q away)
        for q in range(world_size):
            if q == r:
                continue
            # above me: its left halo holds my last positions, my right halo its first; below: the reverse
            mine, theirs = (reach(left, q), reach(right, q)) if q > r else (reach(right, q), reach(left, q))
            if mine:
                self.sends[q] = (L - mine, L) if q > r else (0, mine)
            if theirs:
                self.receives[q] = theirs
        self.zeros_before = max(0, left - r * L)  # positions before the sequence's start
        self.zeros_after = max(0, right - (world_size - 1 - r) * L)  # past the last chunk

    def sent(self) -> dict[int, int]:
        return {q: b - a for q, (a, b) in self.sends.items()}

    def valid(self, x: Tensor, length: int) -> Tensor:
        """``x`` (this chunk, sequence on dim 0) with its positions at or past ``length`` zeroed."""
        keep = max(0, min(self.local_len, length - self.rank * self.local_len))
        if keep == self.local_len:
            return x
        return torch.cat([x[:keep], x.new_zeros((self.local_len - keep, *x.shape[1:]))])


def _exchange(x: Tensor, sent: dict, received: dict, group) -> Tensor:
    """Positions (dim 0 of ``x``, in rank order) to each rank by ``sent``, from each by ``received``
    ({rank: positions}; nothing to or from the others)."""
    x = x.contiguous()
    check_device(x, group, "halo")
    splits = lambda counts: [counts.get(q, 0) for q in range(dist.get_world_size(group))]  # noqa: E731
    out = x.new_empty((sum(received.values()), *x.shape[1:]))
    count("halo", x, x.numel() * x.element_size())
    dist.all_to_all_single(out, x, output_split_sizes=splits(received), input_split_sizes=splits(sent), group=group)
    return out


def _plan(x_len: int, left: int, right: int, group: str, world_size: int):
    pg = resolve_group(group)
    return pg, _Plan(dist.get_rank(pg), world_size, x_len, left, right)


@torch.library.custom_op("autosp::halo", mutates_args=())
def halo(x: Tensor, dim: int, left: int, right: int, length: int, group: str, world_size: int) -> Tensor:
    """``x``'s chunk along ``dim`` with the ``left`` positions before it and the ``right`` after it
    (zeros outside the sequence's ``length`` positions): ``left + L + right`` positions."""
    pg, plan = _plan(x.shape[dim], left, right, group, world_size)
    own = plan.valid(x.movedim(dim, 0), length)
    sent = [own[a:b] for _, (a, b) in sorted(plan.sends.items())]
    got = _exchange(torch.cat(sent) if sent else own[:0], plan.sent(), plan.receives, pg)
    before = sum(n for q, n in plan.receives.items() if q < plan.rank)
    zeros = lambda n: own.new_zeros((n, *own.shape[1:]))  # noqa: E731
    parts = [zeros(plan.zeros_before), got[:before], own, got[before:], zeros(plan.zeros_after)]
    return torch.cat(parts).movedim(0, dim).contiguous()


@halo.register_fake
def _(x, dim, left, right, length, group, world_size):
    shape = list(x.shape)
    shape[dim] += left + right
    return x.new_empty(shape)


@torch.library.custom_op("autosp::halo_grad", mutates_args=())
def halo_grad(grad: Tensor, dim: int, left: int, right: int, length: int, group: str, world_size: int) -> Tensor:
    """Backward of ``halo``: the halos' gradients sent back to the ranks owning those positions and
    added to theirs."""
    n = grad.shape[dim] - left - right
    pg, plan = _plan(n, left, right, group, world_size)
    g = grad.movedim(dim, 0)
    own = g[left:left + n].clone()
    halos = torch.cat([g[plan.zeros_before:left], g[left + n:left + n + right - plan.zeros_after]])
    back = _exchange(halos, plan.receives, plan.sent(), pg)
    at = 0
    for q in sorted(plan.sends):
        a, b = plan.sends[q]
        own[a:b] += back[at:at + b - a]
        at += b - a
    return plan.valid(own, length).movedim(0, dim).contiguous()


@halo_grad.register_fake
def _(grad, dim, left, right, length, group, world_size):
    shape = list(grad.shape)
    shape[dim] -= left + right
    return grad.new_empty(shape)


def _halo_setup(ctx, inputs, output):
    _, ctx.dim, ctx.left, ctx.right, ctx.length, ctx.group, ctx.world_size = inputs


def _halo_backward(ctx, grad):
    return (halo_grad(grad, ctx.dim, ctx.left, ctx.right, ctx.length, ctx.group, ctx.world_size),
            None, None, None, None, None, None)


halo.register_autograd(_halo_backward, setup_context=_halo_setup)
