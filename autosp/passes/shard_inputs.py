"""Pass ``shard_inputs``: shard each full value where it meets an activation op.

Full values (input ids, shifted labels, positions, rotary tables) are computed as on one device;
on each edge into an op whose result is sharded, this pass inserts ``autosp::shard``, which takes
this rank's chunk at run time (padded past the end: with ``ignore_index`` for loss targets, so
padding never reaches the loss). Because labels are sharded where they meet the logits, after
any shift the model applied, every shard boundary is exact. A value is sharded once: identical
views of one value (HF unsqueezes the rotary tables again in every layer) share one shard, and
the views left unread are erased (each graph op costs compile time, and a shard a copy).

Invariant after: no op with a sharded result reads a full value carrying the sequence, except
the attention mask, which attention consumes whole.
"""
from __future__ import annotations

import torch

from autosp.passes.layout import FULL, RULE, SHARDED, SeqLayout, call_arg, is_sharded, layout_of
from autosp.passes.ops import is_relayout, is_view


def _consumes_shards(node) -> bool:
    return node.meta.get(RULE) in ("sdpa", "cross_entropy", "seq_sum", "seq_scatter_add") or \
        is_sharded(layout_of(node))


def _same_value(node):
    """A key equal for nodes that compute the same value: a view or relayout's op and arguments
    (deterministic, and its inputs are nodes or constants), else the node itself."""
    if node.op in ("call_method", "call_function") and (is_view(node) or is_relayout(node)):
        key = (node.op, node.target, node.args, tuple(node.kwargs.items()))
        try:
            hash(key)
            return key
        except TypeError:
            pass
    return node


def shard_inputs(ctx) -> None:
    cache = {}
    for node in list(ctx.graph.nodes):
        if node.op not in ("call_function", "call_method") or not _consumes_shards(node):
            continue
        rule = node.meta.get(RULE)
        keep_full = {call_arg(node, 3, "attn_mask")} if rule == "sdpa" else set()
        if rule == "seq_scatter_add":  # sharded as its index is, element for element (loss.py)
            keep_full = {call_arg(node, 3, "src")}
        pad_value = 0.0
        target = call_arg(node, 1, "target") if rule == "cross_entropy" else None
        for src in node.all_input_nodes:
            lay = layout_of(src)
            if src in keep_full or isinstance(lay, tuple) or lay.state != FULL or lay.dim is None:
                continue
            pad = float(call_arg(node, 4, "ignore_index", -100)) if src is target else pad_value
            key = (_same_value(src), pad)
            if key not in cache:
                length, local_len = ctx.full_size(lay.length), ctx.local_len()
                with ctx.inserting_after(src):
                    cache[key] = ctx.graph.call_function(torch.ops.autosp.shard.default, (
                        src, lay.dim, lay.inner, length, local_len, pad, ctx.group, ctx.world_size))
                ctx.set_layout(cache[key], SeqLayout(SHARDED, lay.dim, lay.inner, lay.length))
                ctx.counters["shard"] += 1
            node.replace_input_with(src, cache[key])
            if not src.users and cache[key].args[0] is not src:  # a copy of the view sharded before
                ctx.graph.erase_node(src)
                ctx.counters["shard_shared"] += 1
