"""Pass ``halo``: a convolution along the sequence reads its neighbours' edge positions.

``conv1d(x, w, padding=p)`` over a sequence chunk (the ``halo`` rule in ``rules.convolution``)
becomes ``conv1d(autosp::halo(x, left, right), w, padding=0)``: the chunk with the ``left``
positions before it and the ``right`` after it, zeros past the sequence's ends as the padding
would give, so the convolution's output is this rank's positions and nothing else. A causal
convolution (padded on both sides, its tail cut off: LFM2's short conv, Mamba's) reads only
positions before: one neighbour sends ``kernel - 1`` positions; a zero ``F.pad`` of the sequence
the convolution reads is folded into its halo. A zero ``F.pad`` of the sequence alone (a token
shift, ``F.pad(x, (0, 0, 1, -1))``) becomes the halo it reads, cut to this rank's positions. The
backward sends the halos' gradients back to the ranks owning those positions.
"""
from __future__ import annotations

import torch

from autosp.collectives import halo as _registers_the_op  # noqa: F401
from autosp.passes.layout import RULE, layout_of, stands_for
from autosp.passes.rules import HALO

HALO_OP = torch.ops.autosp.halo.default


def halo(ctx) -> None:
    for node in list(ctx.graph.nodes):
        rule = node.meta.get(RULE)
        if rule == "halo":
            _convolution(ctx, node)
        elif rule == "shift":
            _shift(ctx, node)


def _extended(ctx, x, before: int, after: int, where):
    """``x``'s chunk with ``before`` positions of the ranks below and ``after`` of those above."""
    lay = layout_of(x)
    with ctx.graph.inserting_before(where):
        node = ctx.graph.call_function(HALO_OP, (x, lay.dim, before, after, ctx.full_size(lay.length),
                                                 ctx.group, ctx.world_size))
    node.meta["stack_trace"] = where.meta.get("stack_trace")
    ctx.counters["halo"] += 1
    return node


def _convolution(ctx, node) -> None:
    """conv1d(x, padding=p) -> conv1d(halo(x), padding=0); a zero F.pad it reads goes into the halo."""
    left, right = node.meta[HALO]
    x = node.args[0]
    padded = x.meta.get(RULE) == "conv_pad"
    args, kwargs = [_extended(ctx, x.args[0] if padded else x, left, right, node), *node.args[1:]], dict(node.kwargs)
    if len(args) > 4:  # conv1d(input, weight, bias, stride, padding, ...)
        args[4] = 0
    else:
        kwargs["padding"] = 0
    node.args, node.kwargs = tuple(args), kwargs
    if padded and not x.users:
        ctx.graph.erase_node(x)


def _shift(ctx, node) -> None:
    """F.pad(x, (a, b)) along the sequence -> this rank's positions of it: x's from i - a on."""
    a, _ = node.meta[HALO]
    x = node.args[0]
    dim = layout_of(x).dim
    extended = _extended(ctx, x, max(a, 0), max(-a, 0), node)
    with ctx.graph.inserting_before(node):
        local = ctx.graph.call_method("narrow", (extended, dim, max(-a, 0), ctx.local_len()))
    node.replace_all_uses_with(stands_for(local, node))
    ctx.graph.erase_node(node)
