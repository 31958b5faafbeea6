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

import operator

import torch
from torch import fx

from autosp.errors import AutoSPError
from autosp.passes.layout import RULE, example_value, is_sharded, layout_of, source_line, stands_for
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
            _check_local(ctx, node)


def _full_sizes(ctx, arg) -> list:
    """The sizes ``arg`` still holds that carry the full sequence length: single sizes were all
    made local above; a shape read off a chunk (``x.shape``) is the chunk's at run time."""
    if isinstance(arg, (tuple, list)):
        return [s for a in arg for s in _full_sizes(ctx, a)]
    value = example_value(arg) if isinstance(arg, fx.Node) else None
    if not isinstance(value, (tuple, list)) or _read_off_a_chunk(arg):
        return []
    return [v for v in value if isinstance(v, torch.SymInt) and ctx.seq.symbol in v.node.expr.free_symbols]


def _read_off_a_chunk(node) -> bool:
    """``x.shape`` of a chunk, a slice of it, or it with constant sizes added (``+ (H,)``)."""
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1:
        return is_sharded(layout_of(node.args[0]))
    if node.op == "call_function" and node.target in (operator.getitem, operator.add):
        shapes = [a for a in node.args if isinstance(a, fx.Node)]
        return bool(shapes) and all(_read_off_a_chunk(a) for a in shapes)
    return False


def _check_local(ctx, node) -> None:
    """The invariant, checked where it is made: a size this pass could not reach (a shape built
    some other way) would reshape a chunk to the whole sequence at run time."""
    left = _full_sizes(ctx, [*node.args, *node.kwargs.values()])
    if left:
        raise AutoSPError(f"cannot shard {ops.op_name(node)} ({node.name}): its size argument {left[0]} is the "
                          f"whole sequence's, built in a way autosp cannot make this rank's (please report it)"
                          f"\n  at {source_line(node)}")
