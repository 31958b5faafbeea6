"""Differentiable eager collectives for module-level sequence parallelism.

The gradient convention is the verifier's and DeepSpeed's: each rank backpropagates, and the
gradients of the SP group are summed. Outside the wrapped blocks every rank holds the full
sequence and computes the same values (replicated); inside a block each rank holds one contiguous
chunk of the sequence, padded at the end of the sequence to ``local_len * world_size``.

* :func:`shard` (replicated -> chunk): backward puts this rank's chunk gradient in a zero tensor;
  no communication. Upstream replicated parameters then get each rank's share, which sum.
* :func:`gather` (chunk -> replicated): backward sums the ranks' gradients of this rank's chunk
  (a reduce-scatter, done with one all-to-all: gloo has no reduce_scatter).
* :func:`count_once` (replicated output -> same): backward keeps the gradient on rank 0 and
  gives zeros elsewhere, so a loss every rank computes from replicated values counts once.

The all-to-alls around attention are autosp's own ops (``autosp::seq_to_head`` and
``head_to_seq``), reached through a group key registered here.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from autosp import collectives

_KEYS = itertools.count()
_KEY_OF: dict = {}  # id(group) -> (group, key); holding the group keeps its id from being reused


def group_key(group: dist.ProcessGroup) -> str:
    """The key under which autosp's collective ops find ``group`` (registered once per group; C++
    process groups take no Python attributes, hence the table)."""
    entry = _KEY_OF.get(id(group))
    if entry is None or entry[0] is not group:
        entry = _KEY_OF[id(group)] = (group, f"multimodal.{next(_KEYS)}")
        collectives.register_group(entry[1], group)
    return entry[1]


@dataclass(frozen=True)
class SeqLayout:
    """How one sequence of ``length`` positions is split: ``local_len`` per rank, padded at the end."""
    length: int
    world_size: int
    rank: int

    @property
    def local_len(self) -> int:
        return max(1, -(-self.length // self.world_size))

    @property
    def padded_len(self) -> int:
        return self.local_len * self.world_size

    @property
    def valid_local(self) -> int:
        """Real (non-padding) positions held by this rank."""
        return max(0, min(self.local_len, self.length - self.rank * self.local_len))

    @classmethod
    def of(cls, length: int, group: dist.ProcessGroup) -> "SeqLayout":
        return cls(length, dist.get_world_size(group), dist.get_rank(group))


def pad_to(x: Tensor, dim: int, size: int, value: float = 0.0) -> Tensor:
    if x.shape[dim] == size:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_full(pad_shape, value)], dim)


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, layout, pad_value):
        ctx.dim, ctx.layout = dim, layout
        padded = pad_to(x, dim, layout.padded_len, pad_value)
        return padded.narrow(dim, layout.rank * layout.local_len, layout.local_len).clone()

    @staticmethod
    def backward(ctx, grad):
        layout, dim = ctx.layout, ctx.dim
        shape = list(grad.shape)
        shape[dim] = layout.padded_len
        full = grad.new_zeros(shape)
        full.narrow(dim, layout.rank * layout.local_len, layout.local_len).copy_(grad)
        return full.narrow(dim, 0, layout.length), None, None, None


def shard(x: Tensor, dim: int, layout: SeqLayout, pad_value: float = 0) -> Tensor:
    """This rank's chunk of the replicated ``x`` along ``dim`` (``pad_value`` past the length)."""
    return _Shard.apply(x, dim, layout, pad_value)


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, layout, group):
        ctx.dim, ctx.layout, ctx.group = dim, layout, group
        chunk = x.contiguous()
        parts = [torch.empty_like(chunk) for _ in range(layout.world_size)]
        collectives._count("all_gather", chunk)
        dist.all_gather(parts, chunk, group=group)
        return torch.cat(parts, dim).narrow(dim, 0, layout.length)

    @staticmethod
    def backward(ctx, grad):
        layout, dim = ctx.layout, ctx.dim
        padded = pad_to(grad, dim, layout.padded_len)
        chunks = padded.movedim(dim, 0).reshape(layout.world_size, layout.local_len, *padded.movedim(dim, 0).shape[1:])
        chunks = chunks.contiguous()
        received = torch.empty_like(chunks)
        collectives._count("reduce_scatter", chunks)
        dist.all_to_all_single(received, chunks, group=ctx.group)
        return received.sum(0).movedim(0, dim), None, None, None


def gather(x: Tensor, dim: int, layout: SeqLayout, group: dist.ProcessGroup) -> Tensor:
    """The full sequence from every rank's chunk of ``x`` along ``dim`` (padding dropped)."""
    return _Gather.apply(x, dim, layout, group)


class _CountOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rank):
        ctx.rank = rank
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.rank == 0 else torch.zeros_like(grad)), None


def count_once(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``x`` unchanged; its gradient is kept on rank 0 only (``x`` is the same on every rank)."""
    return _CountOnce.apply(x, dist.get_rank(group))
