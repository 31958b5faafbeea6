"""Per-op layout rules for activations: positional ops, attention, the loss, sums over the sequence.

``apply`` returns the layout of an activation op's result, records a rule name in
``node.meta["autosp_rule"]`` when a rewrite pass must act on the node, or raises AutoSPError.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from autosp.errors import OutputNeedsOtherRanks
from autosp.passes import ops
from autosp.passes.layout import (REPLICATED_LAYOUT, RULE, SHARDED, SeqLayout, call_arg, example_value, is_sharded,
                                  layout_of, linear_coeffs, refuse, seq_dims, size_expr)

SEVERAL_DIMS = ("it has the sequence on several dims (like a [S, S] mask or attention scores); only "
                "attention may take such a value: scaled_dot_product_attention, or softmax(q @ k^T ...) @ v "
                "written out over [..., heads, S, head_dim] tensors")


def apply(an, node, sharded) -> SeqLayout:
    value = example_value(node)
    if node.target in ops.SDPA:
        return sdpa(an, node)
    if node.target in ops.CROSS_ENTROPY:
        return cross_entropy(an, node)
    if node.target in ops.CONV1D and sharded:
        return convolution(an, node)
    if node.target in ops.PAD and sharded:
        return padding(an, node, value)
    if isinstance(value, (tuple, list)):  # split, chunk, unbind, topk...: one layout per result
        layouts = []
        for element in value:
            dims = seq_dims(element, an.S)
            if len(dims) > 1:
                raise refuse(node, "a result " + SEVERAL_DIMS)
            if not dims and sharded and isinstance(element, torch.Tensor):  # max/min over the sequence
                seq_reduction(an, node)
            layouts.append(positional(an, node, dims[0], element) if dims else REPLICATED_LAYOUT)
        return tuple(layouts)
    if not isinstance(value, torch.Tensor):
        if sharded:
            raise refuse(node, "returns a non-tensor computed from a sequence chunk")
        return REPLICATED_LAYOUT
    out_dims = an.dims(node)
    if len(out_dims) > 1:
        raise refuse(node, "the result " + SEVERAL_DIMS)
    if not out_dims:
        return seq_reduction(an, node) if sharded else REPLICATED_LAYOUT
    return positional(an, node, out_dims[0], example=value)


def _seq_inputs(an, node):
    return [i for i in node.all_input_nodes
            if isinstance(example_value(i), torch.Tensor) and an.dims(i)]


def positional(an, node, out_dim, example) -> SeqLayout:
    """Check ``node`` is positional along the sequence and return its (sharded) result layout."""
    out_ndim = example.dim()
    sources = _seq_inputs(an, node)
    length, inner = None, None
    for src in sources:
        src_layout = layout_of(src)
        if src_layout.dim is None:
            raise refuse(node, f"its input {src.name} " + SEVERAL_DIMS)
        why = _not_positional(an, node, src, src_layout.dim, out_dim, out_ndim)
        if why:
            raise refuse(node, why)
        if length is None or src_layout.state == SHARDED:
            length, inner = src_layout.length, src_layout.inner
    if ops.is_view(node):
        inner = an.mapped_inner(node, out_dim)
        if inner is None:
            raise refuse(node, "the reshape merges the sequence with a dim before it or splits it")
    if node.op == "call_function" and node.target is operator.getitem:
        tail = _getitem_tail(node)
        if tail:
            node.meta[RULE] = "tail_slice"
            length = length - tail
    if length is None:  # created with a sequence size (expand, new_zeros) from a replicated value
        length = an.S
    coeffs = linear_coeffs(size_expr(example.shape[out_dim]), an.S)
    if coeffs is None:
        raise refuse(node, f"the sequence size {example.shape[out_dim]} is not linear in the length")
    return SeqLayout(SHARDED, out_dim, inner or 1, length)


def _not_positional(an, node, src, d, out_dim, out_ndim) -> str | None:
    """Why ``node`` is not positional along dim ``d`` of input ``src`` (None when it is)."""
    nd = example_value(src).dim()
    target = node.target
    first = node.args[0] if node.args else None
    copy = node.op == "call_method" and target == "copy_"  # into a chunk (DeepSeek's MLA fills new_empty keys)
    if ops.is_pointwise(node) or copy:
        if copy and layout_of(first).state != SHARDED:
            return "it writes a sequence chunk into a value every rank holds whole"
        return None if nd - d == out_ndim - out_dim else "broadcasting moves the sequence dim"
    if ops.is_view(node) or ops.is_relayout(node) or ops.takes_shape_args(node):
        return None
    if ops.dim_spec(node) is not None:
        acting = ops.acting_dims(node, nd)
        if acting is None or d in acting:
            if target in (torch.cat, torch.concat):
                return None if _cat_onto_empty(node, src) else CAT_ONTO_SEQUENCE
            return "it reduces, scans, reorders or slices along the sequence"
        return None
    if target is operator.getitem:
        return None if _getitem_seq_item(node, d) is not None else \
            "it selects or slices positions along the sequence"
    if target in ops.LINEAR:
        return None if src is first and d != nd - 1 else "the sequence is a contracted dim"
    if target in ops.MATMUL:
        a, b = node.args[0], node.args[1]
        if src is a and d < nd - 1 and (d < nd - 2 or not an.dims(b)):
            return None
        if src is b and nd >= 2 and d != nd - 2 and (d < nd - 2 or not an.dims(a)):
            return None
        return ("the sequence is contracted, or both sides carry it (attention written out is taken as "
                "softmax(q @ k^T ...) @ v over [..., heads, S, head_dim] tensors)")
    if target in ops.ADDMM:
        bias, a, b = (tuple(node.args) + (None,) * 3)[:3]  # (self, mat1, mat2) as a method too
        rows = nd == 2 and d == 0 and isinstance(b, fx.Node) and not an.dims(b)
        return None if rows and (src is a or src is bias) else "the sequence is contracted, or both sides carry it"
    if node.op == "call_method" and target == "repeat":  # tiled along other dims (DiffLlama's heads)
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        along = sizes[len(sizes) - nd + d] if len(sizes) >= nd else None
        return None if along == 1 and nd - d == out_ndim - out_dim else "it repeats the sequence"
    if target in ops.SCATTER_GATHER:
        along = call_arg(node, 1, "dim")
        return None if isinstance(along, int) and along % nd != d and d == out_dim else \
            "it gathers or scatters along the sequence"
    if target in ops.EMBEDDING:
        weight = node.args[1] if target is torch.nn.functional.embedding else node.args[0]
        return None if src is not weight else "the embedding table carries the sequence"
    if target in ops.NORMS:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        count = len(shape) if isinstance(shape, (list, tuple)) else 1
        return None if src is first and d < nd - count else "it normalises over the sequence"
    return "no rule says this op is positional along the sequence (add one to autosp.passes.ops)"


CAT_ONTO_SEQUENCE = ("it concatenates onto the sequence, as reading a KV cache does (generation with "
                     "past_key_values): sequence parallelism is for training; generate without autosp")


def _cat_onto_empty(node, src) -> bool:
    """``torch.cat`` of the sequence onto tensors that hold nothing: the identity along it. HF's
    ``DynamicCache`` does this in every forward of a model with ``use_cache=True`` (the transformers
    5 default), training included: ``torch.cat([torch.tensor([]), key_states], dim=-2)``."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    others = [t for t in tensors if t is not src]
    return all(isinstance(t, fx.Node) and isinstance(example_value(t), torch.Tensor)
               and example_value(t).numel() == 0 for t in others)


def getitem_dims(node):
    """The index items of ``x[index]``, Ellipsis expanded, and the item applied to each input dim."""
    index = node.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    nd = example_value(node.args[0]).dim()
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded = []
    for it in items:
        if it is Ellipsis:
            expanded += [slice(None)] * (nd - consumed)
        else:
            expanded.append(it)
    dims = [it for it in expanded if it is not None]
    dims += [slice(None)] * (nd - len(dims))
    return expanded, dims


def _getitem_seq_item(node, d):
    """The index item applied to input dim ``d`` when it keeps every position (else None)."""
    expanded, dims = getitem_dims(node)
    item = dims[d]
    if isinstance(item, slice) and isinstance(item.start, int) and item.start < 0 and item.stop is None \
            and item.step in (None, 1) and _keeps_length(node, expanded, d):
        return item  # the last N positions where the traced lengths are at most N (a window's cache)
    if not isinstance(item, slice) or item.start not in (None, 0) or item.step not in (None, 1):
        return None
    if item.stop is None:
        return item
    if isinstance(item.stop, int):
        return item if item.stop < 0 else None
    if isinstance(item.stop, fx.Node):
        full = size_expr(example_value(node.args[0]).shape[d])
        stop = size_expr(example_value(item.stop))
        diff = full - stop
        return item if diff.is_Integer and int(diff) >= 0 else None
    return None


def _keeps_length(node, expanded, d) -> bool:
    """Whether ``x[expanded]``'s result has input dim ``d``'s size (basic indexing only)."""
    dim = out = 0
    for it in expanded:
        if it is None:
            out += 1
        elif not isinstance(it, (int, slice)):
            return False
        elif dim == d:
            full, kept = example_value(node.args[0]).shape[d], example_value(node).shape[out]
            return isinstance(it, slice) and (size_expr(full) - size_expr(kept)) == 0
        else:
            dim, out = dim + 1, out + isinstance(it, slice)
    return False


def _getitem_tail(node, d: int | None = None) -> int:
    """How many trailing positions a slice of the sequence (on dim ``d``, else its input's) drops
    (0 for a full slice, or for no slice of the positions)."""
    src = node.args[0]
    d = layout_of(src).dim if d is None else d
    item = _getitem_seq_item(node, d)
    if item is None or item.stop is None:
        return 0
    if isinstance(item.stop, int):
        return -item.stop
    full = size_expr(example_value(src).shape[d])
    return int(full - size_expr(example_value(item.stop)))


def seq_reduction(an, node) -> SeqLayout:
    """An activation op whose result has no sequence dim: only sums and means are allowed."""
    key = node.target
    if node.op == "call_method" and key in ops.FRESH_METHODS:
        return REPLICATED_LAYOUT  # sizes without the sequence: nothing of the chunk is read
    if key in ops.HISTC:
        lo, hi = call_arg(node, 2, "min", 0), call_arg(node, 3, "max", 0)
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))) or lo >= hi:
            raise refuse(node, "a histogram of the sequence over the range of its values (min == max): each "
                               "rank's chunk has its own range; give min and max")
        node.meta[RULE] = "seq_histc"  # a count over the sequence (HF's MoE load-balancing loss)
        return REPLICATED_LAYOUT
    if key in ops.SCATTER_ADD:
        return _scatter_add(an, node)
    if key in ops.SEQ_SUM_REDUCTIONS:
        src = node.args[0]
        acting = ops.acting_dims(node, example_value(src).dim())
        if acting is None or layout_of(src).dim in acting:
            node.meta[RULE] = "seq_sum"
            return REPLICATED_LAYOUT
    if key is operator.getitem:
        if _kept_for_the_caller(node):
            raise OutputNeedsOtherRanks(refuse(node, "it picks positions of the sequence for an output nothing "
                                                     "in the step reads (as HF's sliding-window KV cache and its "
                                                     "convolution states keep the last ones; use_cache=False "
                                                     "builds none)").args[0])
        raise refuse(node, "it picks positions of the sequence (e.g. last-token or class-token "
                           "pooling): not supported on a sharded sequence")
    raise refuse(node, "it reduces or mixes values along the sequence and has no sequence-parallel rule")


def _scatter_add(an, node) -> SeqLayout:
    """``dest.scatter_add(dim, index, src)`` of values carrying the sequence along ``dim`` into a
    ``dest`` without it (HF's MoE load-balancing loss counts the unmasked tokens per expert): a
    sum over the sequence, each rank's positions scattered, summed over the group."""
    dest, dim, index, src = (call_arg(node, i, n) for i, n in enumerate(("self", "dim", "index", "src")))
    nd = example_value(index).dim() if isinstance(index, fx.Node) else 0
    along = lambda t: isinstance(t, fx.Node) and layout_of(t).dim is not None and \
        layout_of(t).dim == dim % max(nd, 1)  # noqa: E731
    if not isinstance(dest, fx.Node) or an.dims(dest) or not (along(index) and along(src)):
        raise refuse(node, "it scatters along the sequence into a value that carries it, or reads the sequence "
                           "off the scattered dim")
    if node.op == "call_method" and node.target == "scatter_add_" and len(dest.users) > 1:
        raise refuse(node, "it adds into a value that other ops read too")
    node.meta[RULE] = "seq_scatter_add"
    return REPLICATED_LAYOUT


def _kept_for_the_caller(node) -> bool:
    """Whether ``node`` only reaches graph outputs: returned itself, or copied into a buffer that
    only the outputs read (HF's ``conv_states[i].copy_(states[..., -K:])``)."""
    for user in node.users:
        if user.op == "output":
            continue
        copy = user.op == "call_method" and user.target == "copy_" and user.args[1:2] == (node,)
        if not copy or not all(u.op == "output" for u in user.users) or \
                not all(u is user or u.op == "output" for u in user.args[0].users):
            return False
    return True


def sdpa(an, node) -> SeqLayout:
    q, k, v = (call_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    for t in (q, k, v):
        lay, nd = layout_of(t), example_value(t).dim()
        if lay.state != SHARDED or lay.dim != nd - 2 or nd < 3:
            raise refuse(node, f"{t.name} is not sequence-sharded on dim -2 ([..., heads, S, head_dim])")
        if lay.inner != 1 or lay.length is None or (lay.length - an.S) != 0:
            raise refuse(node, f"{t.name} does not cover the whole sequence")
    mask = call_arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        mask_layout = layout_of(mask)
        nd = example_value(mask).dim()
        if mask_layout.state == SHARDED:
            raise refuse(node, "the attention mask depends on parameters (a learned bias): not supported")
        if any(d < nd - 2 for d in an.dims(mask)):
            raise refuse(node, "the attention mask carries the sequence outside its last two dims")
    node.meta[RULE] = "sdpa"
    return SeqLayout(SHARDED, example_value(node).dim() - 2, 1, an.S)


def cross_entropy(an, node) -> SeqLayout:
    logits, target = node.args[0], call_arg(node, 1, "target")
    lay = layout_of(logits)
    if lay.state != SHARDED:
        raise refuse(node, "the logits are not sequence-sharded")
    if example_value(logits).dim() >= 2 and lay.dim == 1:
        raise refuse(node, "the sequence is the class dim of the logits")
    if call_arg(node, 3, "size_average") is not None or call_arg(node, 5, "reduce") is not None:
        raise refuse(node, "legacy size_average/reduce arguments: use reduction=")
    if not isinstance(target, fx.Node) or not an.dims(target):
        raise refuse(node, "the target does not carry the sequence")
    if layout_of(target).dim is None:
        raise refuse(node, "the target " + SEVERAL_DIMS)
    node.meta[RULE] = "cross_entropy"
    if call_arg(node, 6, "reduction", "mean") == "none":
        out_dim = lay.dim if lay.dim == 0 else lay.dim - 1
        return SeqLayout(SHARDED, out_dim, lay.inner, lay.length)
    return REPLICATED_LAYOUT


HALO = "autosp_halo"  # (left, right) positions a convolution reads past a rank's chunk


def convolution(an, node) -> SeqLayout:
    """``conv1d`` along the sequence (its length dim), stride 1: a rank's outputs are its own
    positions' once it holds the ``left`` positions before its chunk and the ``right`` after it
    (``autosp::halo``, inserted by the ``halo`` pass). Its input may be a zero ``F.pad`` of the
    sequence (a causal conv written as pad, then conv). Its outputs past the input's length (a
    causal conv padded on both sides) may only be cut off."""
    x, weight, bias = node.args[0], call_arg(node, 1, "weight"), call_arg(node, 2, "bias")
    before, after = x.meta[HALO] if x.meta.get(RULE) == "conv_pad" else (0, 0)
    x = x.args[0] if x.meta.get(RULE) == "conv_pad" else x
    lay, nd = layout_of(x), example_value(x).dim()
    if any(isinstance(t, fx.Node) and (is_sharded(layout_of(t)) or an.dims(t)) for t in (weight, bias)):
        raise refuse(node, "its weight or bias carries the sequence")
    if lay.state != SHARDED or lay.dim != nd - 1 or lay.inner != 1 or lay.length is None:
        raise refuse(node, "the sequence is not the convolution's length dim (its last)")
    stride, dilation, padding = (call_arg(node, i, n, d) for i, n, d in
                                 ((3, "stride", 1), (5, "dilation", 1), (4, "padding", 0)))
    stride, dilation = _single(stride), _single(dilation)
    if stride != 1:
        raise refuse(node, f"a stride of {stride} along the sequence (a rank's outputs are its positions' only "
                           "at stride 1)")
    reach = dilation * (int(example_value(weight).shape[-1]) - 1)
    if padding == "same":
        pad_left = reach // 2  # torch puts the odd position on the right
        pad_right = reach - pad_left
    else:
        pad_left = pad_right = 0 if padding == "valid" else _single(padding)
    left, pad_right = pad_left + before, pad_right + after
    right = reach - left
    if right < 0:
        raise refuse(node, f"it pads {left} positions before the sequence, past its kernel's {reach + 1}")
    _cut_off(node, pad_right - right, nd - 1, "convolution")
    node.meta[RULE], node.meta[HALO] = "halo", (left, right)
    return SeqLayout(SHARDED, nd - 1, 1, lay.length + pad_right - right)


def padding(an, node, value) -> SeqLayout:
    """``F.pad`` with zeros along the sequence: into the convolution reading it (``convolution``)
    or, alone, ``a`` zeros before and ``b`` after (negative: positions cut off), so that position
    i holds position i - a: a token shift (``F.pad(x, (0, 0, 1, -1))``). Both become halos."""
    x, pad = node.args[0], call_arg(node, 1, "pad")
    mode, fill = call_arg(node, 2, "mode", "constant"), call_arg(node, 3, "value", None)
    lay, nd = layout_of(x), example_value(x).dim()
    pair = 2 * (nd - 1 - lay.dim)  # F.pad's pairs run from the last dim backwards
    if len(pad) <= pair or pad[pair] == pad[pair + 1] == 0:
        return positional(an, node, lay.dim, value)
    if mode != "constant" or fill not in (None, 0, 0.0) or lay.inner != 1 or lay.length is None:
        raise refuse(node, f"it pads the sequence with {mode} {fill} (only zeros are sharded, by the neighbours' "
                           "positions)")
    a, b = pad[pair], pad[pair + 1]
    if not (isinstance(a, int) and isinstance(b, int)) or any(pad[:pair] + pad[pair + 2:]):
        raise refuse(node, f"it pads the sequence by {pad[pair:pair + 2]} and other dims too")
    if lay.dim == nd - 1 and a >= 0 and b >= 0 and node.users and all(
            u.target in ops.CONV1D and u.args[0] is node for u in node.users):
        node.meta[RULE], node.meta[HALO] = "conv_pad", (a, b)
        return SeqLayout(SHARDED, lay.dim, 1, lay.length + a + b)
    _cut_off(node, a + b, lay.dim, "padding")
    node.meta[RULE], node.meta[HALO] = "shift", (a, b)
    return SeqLayout(SHARDED, lay.dim, 1, lay.length + a + b)


def _cut_off(node, extra: int, d: int, what: str) -> None:
    """``node``'s last ``extra`` positions, past its input's end, must be cut off by every user
    (a rank holds the positions of the input's length only)."""
    for user in node.users if extra > 0 else ():
        if not (user.target is operator.getitem and _getitem_tail(user, d) >= extra):
            raise refuse(user, f"it reads the {what}'s last {extra} outputs, past the sequence's end (only "
                               "cutting them off, as a causal convolution does, is sharded)")


def _single(value):
    """An int conv argument given as an int or a one-element tuple."""
    return value[0] if isinstance(value, (tuple, list)) and len(value) == 1 else value
