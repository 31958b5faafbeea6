"""Pass ``local_sizes``: make sizes agree with sharded values.

- Size arguments (view, reshape, expand, new_zeros, ...) of ops with a sharded result: the
  sequence size becomes the local one, ``a*S + b -> a * ceil(S/P)``.
- A size read off a chunk (``x.size(1)`` on a sharded ``x``) means, in the model's code, the
  full size: it becomes the full size, so ``arange(x.size(1))`` still builds every position.
- A slice dropping trailing positions of a sharded value (``logits[:, :-1]``) keeps the chunk
  whole; the layout's shorter length marks the dropped positions as padding.

- Inside a token-wise module (``token_wise.py``) every size argument is local: the module runs on
  this rank's tokens (``arange(num_tokens)`` counts them).

Invariant after: every size argument on a sharded value is local, every other one full.
"""
from __future__ import annotations


import torch
from torch import fx

from autosp.passes.layout import RULE, example_value, is_sharded, layout_of, stands_for
from autosp.passes import ops, token_wise
from autosp.passes.rules import getitem_dims


def _localize(ctx, arg):
    if isinstance(arg, (tuple, list)):
        return type(arg)(_localize(ctx, a) for a in arg)
    if isinstance(arg, fx.Node) and arg.target is torch.Size and len(arg.args) == 1:
        return _localize(ctx, list(arg.args[0]))  # a shape Dynamo built (``input_shape + (H,)``)
    if isinstance(arg, fx.Node) and isinstance(example_value(arg), torch.SymInt):
        expr = example_value(arg).node.expr
        if ctx.seq.symbol in expr.free_symbols:
            ctx.counters["local_size"] += 1
            return ctx.local_size(expr)
    return arg


def local_sizes(ctx) -> None:
    for node in list(ctx.graph.nodes):
        rule = node.meta.get(RULE)
        if rule == "full_size":
            full = ctx.full_size(example_value(node).node.expr)
            node.replace_all_uses_with(stands_for(full, node))
            ctx.graph.erase_node(node)
            ctx.counters["full_size"] += 1
        elif rule == "tail_slice":
            src = node.args[0]
            expanded, dims = getitem_dims(node)
            target = dims[layout_of(src).dim]
            position = next(i for i, it in enumerate(expanded) if it is target)
            expanded[position] = slice(None)
            node.args = (src, tuple(expanded))
            ctx.counters["tail_slice"] += 1
        elif rule == token_wise.RULE or (is_sharded(layout_of(node)) and ops.takes_shape_args(node)):
            node.args = tuple(_localize(ctx, a) for a in node.args)
            node.kwargs = {k: _localize(ctx, v) for k, v in node.kwargs.items()}
