"""Pass ``loss``: reductions over the sequence become reductions over the group.

- ``cross_entropy(logits, target, reduction="mean")`` -> the group sum of this rank's summed
  loss divided by the number of valid targets of the whole sequence, counted on the full target
  (no collective needed for the count). Exact whatever each shard holds, even no valid label.
- ``reduction="sum"`` -> the group sum; ``"none"`` stays positional.
- ``x.sum(...)`` / ``x.mean(...)`` over the sequence -> padding masked out, local sum, group sum,
  divided by the full count for a mean.

``group_sum`` has an identity backward: gradients summed over the group equal the single-device
gradient (the loss is not counted P times).
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from autosp.passes import ops
from autosp.passes.layout import RULE, call_arg, example_value, layout_of, size_expr, stands_for

GROUP_SUM, MASK = torch.ops.autosp.group_sum.default, torch.ops.autosp.mask_padding.default


def loss(ctx) -> None:
    for node in list(ctx.graph.nodes):
        rule = node.meta.get(RULE)
        if rule == "cross_entropy" and call_arg(node, 6, "reduction", "mean") != "none":
            _cross_entropy(ctx, node)
        elif rule == "seq_sum":
            _seq_sum(ctx, node)


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
    lay = layout_of(src)
    shape = example_value(src).shape
    dims = ops.acting_dims(node, len(shape))
    reduced = range(len(shape)) if dims is None else dims
    with g.inserting_before(node):
        masked = g.call_function(MASK, (src, lay.dim, lay.inner, ctx.full_size(lay.length),
                                         ctx.local_len(), ctx.group))
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
