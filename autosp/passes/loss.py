"""Pass ``loss``: reductions over the sequence become reductions over the group.

- ``cross_entropy(logits, target, reduction="mean")`` -> the group sum of this rank's summed
  loss divided by the number of valid targets of the whole sequence, counted on the full target
  (no collective needed for the count). Exact whatever each shard holds, even no valid label.
- ``reduction="sum"`` -> the group sum; ``"none"`` stays positional.
- ``x.sum(...)`` / ``x.mean(...)`` over the sequence -> padding masked out, local sum, group sum,
  divided by the full count for a mean.
- ``torch.histc(x, bins, min, max)`` over the sequence (HF's MoE load-balancing loss counts the
  tokens per expert) -> padding moved below ``min``, local counts, group sum; likewise
  ``dest.scatter_add(dim, index, src)`` of the sequence into a ``dest`` without it -> this rank's
  positions (padding's index and src zeroed) scattered into zeros, group sum, added to ``dest``.

``group_sum`` has an identity backward: gradients summed over the group equal the single-device
gradient (the loss is not counted P times).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from autosp.passes import ops
from autosp.passes.layout import FULL, RULE, call_arg, example_value, layout_of, size_expr, stands_for

GROUP_SUM, MASK = torch.ops.autosp.group_sum.default, torch.ops.autosp.mask_padding.default
SHARD = torch.ops.autosp.shard.default


def loss(ctx) -> None:
    for node in list(ctx.graph.nodes):
        rule = node.meta.get(RULE)
        if rule == "cross_entropy" and call_arg(node, 6, "reduction", "mean") != "none":
            _cross_entropy(ctx, node)
        elif rule == "seq_sum":
            _seq_sum(ctx, node)
        elif rule == "seq_histc":
            _seq_histc(ctx, node)
        elif rule == "seq_scatter_add":
            _seq_scatter_add(ctx, node)


def _cross_entropy(ctx, node) -> None:
    g = ctx.graph
    logits, target = node.args[0], call_arg(node, 1, "target")
    full_target = target.args[0]  # shard_inputs put a shard between the full target and the loss
    weight, ignore = call_arg(node, 2, "weight"), call_arg(node, 4, "ignore_index", -100)
    smoothing = call_arg(node, 7, "label_smoothing", 0.0)
    with g.inserting_before(node):
        local = g.call_function(F.cross_entropy, (logits, target), dict(
            weight=weight, ignore_index=ignore, reduction="sum", label_smoothing=smoothing))
        total = g.call_function(GROUP_SUM, (local, ctx.group))
        if call_arg(node, 6, "reduction", "mean") == "mean":
            valid = g.call_function(torch.ne, (full_target, ignore))
            if weight is None:
                count = g.call_method("sum", (valid,))
            else:  # the weighted count: sum of weight[target] over valid targets
                safe = g.call_function(torch.where, (valid, full_target, 0))
                picked = g.call_function(operator.getitem, (weight, safe))
                count = g.call_method("sum", (g.call_function(torch.mul, (picked, valid)),))
            total = g.call_function(torch.div, (total, count))
    node.replace_all_uses_with(stands_for(total, node))
    g.erase_node(node)
    ctx.counters["loss"] += 1
    ctx.counters["all_reduce"] += 1


def _seq_sum(ctx, node) -> None:
    g = ctx.graph
    src = node.args[0]
    shape = example_value(src).shape
    dims = ops.acting_dims(node, len(shape))
    reduced = range(len(shape)) if dims is None else dims
    with g.inserting_before(node):
        masked = _masked(ctx, src)
        target = "sum" if node.op == "call_method" else torch.sum
        local = g.create_node(node.op, target, (masked, *node.args[1:]), dict(node.kwargs))
        total = g.call_function(GROUP_SUM, (local, ctx.group))
        if node.target in ("mean", torch.mean):
            count = math.prod(size_expr(shape[d]) for d in reduced)
            total = g.call_function(torch.div, (total, ctx.full_size(count)))
    node.replace_all_uses_with(stands_for(total, node))
    g.erase_node(node)
    ctx.counters["seq_sum"] += 1
    ctx.counters["all_reduce"] += 1


def _seq_histc(ctx, node) -> None:
    """``histc(x, bins, min, max)`` over the sequence: this rank's positions counted, its padding
    moved below ``min`` (left out), the counts summed over the group."""
    g = ctx.graph
    src = node.args[0]
    lo = call_arg(node, 2, "min", 0)
    with g.inserting_before(node):
        valid = _masked(ctx, g.call_function(torch.ones_like, (src,)), layout_of(src))
        kept = g.call_function(torch.where, (g.call_function(torch.ne, (valid, 0)), src, lo - 1))
        local = g.create_node(node.op, node.target, (kept, *node.args[1:]), dict(node.kwargs))
        total = g.call_function(GROUP_SUM, (local, ctx.group))
    node.replace_all_uses_with(stands_for(total, node))
    g.erase_node(node)
    ctx.counters["seq_histc"] += 1
    ctx.counters["all_reduce"] += 1


def _masked(ctx, value, lay=None):
    """``value`` (a chunk, laid out as ``lay`` or its own layout) with its padding positions zeroed."""
    lay = lay or layout_of(value)
    return ctx.graph.call_function(MASK, (value, lay.dim, lay.inner, ctx.full_size(lay.length), ctx.local_len(),
                                          ctx.group))


def _seq_scatter_add(ctx, node) -> None:
    g = ctx.graph
    dest, dim, index, src = (call_arg(node, i, n) for i, n in enumerate(("self", "dim", "index", "src")))
    lay = layout_of(index)
    with g.inserting_before(node):
        if layout_of(src).state == FULL:  # its chunk as the index's: its own shape may not tell (a repeat_interleave)
            src = g.call_function(SHARD, (src, lay.dim, lay.inner, ctx.full_size(lay.length), ctx.local_len(), 0.0,
                                          ctx.group, ctx.world_size))
            ctx.set_layout(src, lay)
        zeros = g.call_function(torch.zeros_like, (dest,))
        local = g.call_method("scatter_add", (zeros, dim, _masked(ctx, index), _masked(ctx, src)))
        total = g.call_function(torch.add, (dest, g.call_function(GROUP_SUM, (local, ctx.group))))
    node.replace_all_uses_with(stands_for(total, node))
    g.erase_node(node)
    ctx.counters["seq_scatter_add"] += 1
    ctx.counters["all_reduce"] += 1
