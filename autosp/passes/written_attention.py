"""Attention written out (``softmax(q @ k.transpose(-2, -1) * scale + mask) @ v``, or the same as
einsums: HF's eager attention, nanoGPT, most hand-written models): Ulysses around the whole of it.

The *region* runs from a matmul whose result carries the sequence on its last two dims (queries x
keys: the scores) through every op that reads the scores (scale, mask, softcap, softmax, dropout,
sinks), up to the matmul that contracts the keys with the values. ``find`` marks it from the
shapes before the layout walk; ``visit`` checks it during the walk; the pass rewrites it:

- q, k^T and v go through ``seq_to_head_whole`` (without the padding positions), so the model's own
  ops run unchanged on this rank's heads over the whole sequence, every size in them the model's
  own (S, not a chunk's);
- a value the region reads beside the scores is used whole (an [S, S] mask built from the
  inputs, as on one device), or cut to this rank's heads where it has one entry per head
  (``autosp::head_chunk``: GPT-OSS's sinks, a per-head bias); a chunk of the sequence is refused;
- the output goes through ``head_whole_to_seq`` (its padding positions back).

The scores' dim before their two sequence dims is the one split over the ranks (the heads; for an
einsum, the label before the queries'), and each operand's sequence and heads dims are read from
the matmul's convention or the einsum's labels: the region may act along any dim but that one.
The scores stay [S, S] per head, as the model wrote them: 1/P of one device's, unlike SDPA's O(S)
(docs/usage.md).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from autosp.collectives import kv_repeats
from autosp.passes import ops
from autosp.passes.attention import REPEAT, unrepeated
from autosp.passes.layout import (FULL, HEADS, RULE, SHARDED, VALUE_OF, SeqLayout, example_value, layout_of,
                                  refuse, seq_dims, stands_for)
from autosp.passes.rules import getitem_dims

REGION = "autosp_written_attention"  # node.meta of the scores, the body and the output: its Region
SIDE = "autosp_written_attention_side"  # node.meta: feeds only a region (built whole, never chunked)
CHUNK = "autosp_written_attention_chunk"  # node.meta of a body node: {input: its dim of heads}
S2H, H2S = torch.ops.autosp.seq_to_head_whole.default, torch.ops.autosp.head_whole_to_seq.default
HEAD_CHUNK = torch.ops.autosp.head_chunk.default


@dataclass(eq=False)
class Region:
    scores: fx.Node  # q @ k^T
    split_dim: int  # the scores' dim split over the ranks (the heads)
    dims: dict  # q, k^T (then v) -> (its sequence dim, its heads dim)
    body: set = field(default_factory=set)  # the scores and every node reading them, up to the output
    output: fx.Node | None = None  # probs @ v
    output_dims: tuple = ()  # (sequence dim, heads dim) of the output
    leak: tuple | None = None  # (body node, a reader past the body: the graph's output, a second matmul)
    clash: fx.Node | None = None  # a node of another region reading this one's values

    @property
    def ndim(self) -> int:
        return example_value(self.scores).dim()

    @property
    def heads(self) -> int:
        return int(example_value(self.scores).shape[self.split_dim])


def _seq_dim(value, symbol) -> int | None:
    """The one dim of a tensor carrying the sequence (None: none or several)."""
    dims = seq_dims(value, symbol) if isinstance(value, torch.Tensor) and value.dim() >= 3 else []
    return dims[0] if len(dims) == 1 else None


def _einsum(node):
    """(input labels per operand, output labels, operands) of a two-operand einsum, else None."""
    if node.op != "call_function" or node.target is not torch.einsum or not node.args \
            or not isinstance(node.args[0], str) or "." in node.args[0] or "->" not in node.args[0]:
        return None
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    inputs, out = node.args[0].replace(" ", "").split("->")
    inputs = inputs.split(",")
    if len(inputs) != 2 or len(operands) != 2 or not all(isinstance(o, fx.Node) for o in operands):
        return None
    return inputs, out, list(operands)


def _scores_dims(node, symbol):
    """(split dim, {q: (seq dim, heads dim), k^T: (...)}) when ``node`` is q @ k^T over the
    sequence on both sides (a matmul, or an einsum such as ``bhid,bhjd->bhij``), else None."""
    value = example_value(node)
    seq = seq_dims(value, symbol) if isinstance(value, torch.Tensor) else []
    if node.op in ("call_function", "call_method") and node.target in ops.MATMUL and len(node.args) >= 2:
        a, b = node.args[:2]
        ranks = [example_value(t).dim() if isinstance(t, fx.Node) and isinstance(example_value(t), torch.Tensor)
                 else 0 for t in (a, b, node)]
        if min(ranks) >= 3 and seq == [ranks[2] - 2, ranks[2] - 1] and a is not b \
                and _seq_dim(example_value(a), symbol) == ranks[0] - 2 \
                and _seq_dim(example_value(b), symbol) == ranks[1] - 1:
            return ranks[2] - 3, {a: (ranks[0] - 2, ranks[0] - 3), b: (ranks[1] - 1, ranks[1] - 3)}
        return None
    einsum = _einsum(node)
    if einsum is None or len(seq) != 2:
        return None
    (q_labels, k_labels), out, (q, k) = einsum
    q_seq, k_seq = _seq_dim(example_value(q), symbol), _seq_dim(example_value(k), symbol)
    if q is k or q_seq is None or k_seq is None or seq[0] < 1 \
            or [out.find(q_labels[q_seq]), out.find(k_labels[k_seq])] != seq:
        return None
    split = out[seq[0] - 1]  # the label before the queries: heads in bhqk
    if split not in q_labels or split not in k_labels:
        return None
    return seq[0] - 1, {q: (q_seq, q_labels.index(split)), k: (k_seq, k_labels.index(split))}


def _output_dims(node, region, symbol):
    """((v's seq dim, heads dim), (the result's)) when ``node`` contracts the region's keys with v
    (``probs @ v``, or an einsum such as ``bhij,bhjd->bhid``), else None."""
    value = example_value(node)
    if node.op in ("call_function", "call_method") and node.target in ops.MATMUL and len(node.args) >= 2:
        probs, v = node.args[0], node.args[1]
        if probs not in region.body or not isinstance(v, fx.Node) or v in region.body:
            return None
        nd_v, nd = example_value(v).dim() if isinstance(example_value(v), torch.Tensor) else 0, region.ndim
        if _seq_dim(value, symbol) == nd - 2 and _seq_dim(example_value(v), symbol) == nd_v - 2 == nd - 2:
            return v, (nd - 2, nd - 3), (nd - 2, nd - 3)
        return None
    einsum = _einsum(node)
    if einsum is None:
        return None
    (p_labels, v_labels), out, (probs, v) = einsum
    v_seq, out_seq = _seq_dim(example_value(v), symbol), _seq_dim(value, symbol)
    if probs not in region.body or v in region.body or v_seq is None or out_seq is None \
            or len(p_labels) != region.ndim:
        return None
    split, query, key = p_labels[region.split_dim], out[out_seq], v_labels[v_seq]
    if key in out or key not in p_labels or query not in p_labels or split not in v_labels or split not in out:
        return None
    return v, (v_seq, v_labels.index(split)), (out_seq, out.index(split))


def find(graph: fx.Graph, symbol) -> int:
    """Mark every region (see the module's docstring); returns how many."""
    regions = 0
    for node in graph.nodes:
        found = None if REGION in node.meta else _scores_dims(node, symbol)
        if found is None:
            continue
        region = Region(node, found[0], found[1], {node})
        todo = [node]
        while todo:
            current = todo.pop()
            for user in current.users:
                if user in region.body or user is region.output:
                    continue
                if REGION in user.meta:  # another attention's scores meet these (differential attention)
                    region.clash = region.clash or user
                    continue
                out = _output_dims(user, region, symbol) if region.output is None else None
                if out is not None and out[0] not in region.dims:  # (v is not q or k)
                    region.output, region.dims[out[0]], region.output_dims = user, out[1], out[2]
                elif user.op == "output" or user.target in ops.MATMUL:
                    region.leak = region.leak or (current, user)
                else:
                    region.body.add(user)
                    todo.append(user)
        for member in (*region.body, region.output):
            if member is not None:
                member.meta[REGION] = region
        _mark_side(region)
        regions += 1
    return regions


def _mark_side(region) -> None:
    """Nodes whose every user is in the region or feeds only it: values the region reads whole
    (or cut by heads), never sequence chunks even where they carry the sequence (an expand of a
    parameter to S rows, GPT-OSS's sinks)."""
    inside = region.body | {region.output}
    todo = [i for n in region.body for i in n.all_input_nodes if i not in inside]
    while todo:
        node = todo.pop()
        if SIDE in node.meta or node.op != "call_function" and node.op != "call_method":
            continue
        if all(u in inside or SIDE in u.meta for u in node.users):
            node.meta[SIDE] = True
            todo += node.all_input_nodes


def side_layout(an, node, sharded):
    """Layout of a node feeding only a region, or None where the usual rules apply (it reads a
    chunk: q, k and v themselves)."""
    if not node.meta.get(SIDE) or sharded:
        return None
    value = example_value(node)
    if isinstance(value, (tuple, list)) or not isinstance(value, torch.Tensor):
        return None
    return an.whole_layout(node)


def visit(an, node, sharded) -> SeqLayout:
    """Layout of a node of a region (the scores, the body, the output), its checks made."""
    region = node.meta[REGION]
    operands = list(region.dims)  # q, k^T, and v once the output is found
    if node is region.output:
        _check_operand(an, node, operands[2], region)
        if region.leak is not None:
            read, reader = region.leak
            where = "the model's outputs" if reader.op == "output" else f"{reader.name}"
            raise refuse(read, f"attention written out: {where} read this value (attention weights, a [S, S] value "
                               f"per head) besides the attention's output: return none (output_attentions=False)")
        node.meta[RULE] = "written_attention"
        return SeqLayout(SHARDED, region.output_dims[0], 1, an.S)
    if region.clash is not None:
        raise refuse(region.clash, "two attention weights of attention written out meet here (differential "
                                   "attention): not supported")
    if region.output is None:
        raise refuse(region.scores, "attention written out (q @ k^T) whose scores never meet the values "
                                    "(no matmul with v): only softmax(q k^T) v-shaped attention is supported")
    if node is region.scores:
        _check_operand(an, node, operands[0], region, query=True)
        _check_operand(an, node, operands[1], region)
    else:
        _check_body_op(node, region)
        _check_side_inputs(an, node, region)
    return SeqLayout(HEADS)


def _check_operand(an, node, operand, region, query=False) -> None:
    """q, k^T, v: this rank's chunk of the whole sequence, the scores' heads (k and v: or one
    head the matmul broadcasts)."""
    lay, value = layout_of(operand), example_value(operand)
    seq_dim, head_dim = region.dims[operand]
    if lay.state != SHARDED or lay.dim != seq_dim or lay.inner != 1 or lay.length is None or lay.length - an.S != 0:
        raise refuse(node, f"{operand.name}, an input of attention written out, is not this rank's chunk of the "
                           f"whole sequence on dim {seq_dim}")
    heads = value.shape[head_dim]
    if heads != region.heads and (heads != 1 or query):
        raise refuse(node, f"{operand.name} {tuple(value.shape)} has neither the scores' {region.heads} heads nor one "
                           f"on dim {head_dim}")


def _check_body_op(node, region) -> None:
    """An op between the scores and the output must keep the split dim whole and each of its
    entries apart: elementwise, or acting on other dims."""
    values = example_value(node)
    for value in values if isinstance(values, (tuple, list)) else (values,):
        if isinstance(value, torch.Tensor) and (value.dim() != region.ndim
                                                or value.shape[region.split_dim] != region.heads):
            raise refuse(node, f"inside attention written out, it changes the scores' shape to "
                               f"{tuple(value.shape)}: the heads dim {region.split_dim} must stay whole")
    d = region.split_dim
    if node.op == "call_function" and node.target is operator.getitem:
        source = example_value(node.args[0])
        if isinstance(source, (tuple, list)):
            return  # an element of (values, indices)
        expanded, dims = getitem_dims(node)
        if any(it is None for it in expanded) or dims[d] != slice(None):
            raise refuse(node, "inside attention written out, it indexes the heads dim")
        return
    if ops.is_pointwise(node):
        return
    if ops.dim_spec(node) is not None:
        acting = ops.acting_dims(node, region.ndim)
        if acting is not None and d not in acting:
            return
    raise refuse(node, f"inside attention written out, it is neither elementwise nor acting along dims other "
                       f"than the heads dim {d}")


def _check_side_inputs(an, node, region) -> None:
    """Values the body reads beside the scores: whole, or this rank's heads of a per-head value."""
    chunks = {}
    for src in node.all_input_nodes:
        if REGION in src.meta and src.meta[REGION] is region:
            continue
        if an.dims(src) and layout_of(src).state not in (FULL, HEADS):
            raise refuse(node, f"inside attention written out, it reads {src.name}, a chunk of the sequence "
                               f"(a bias computed from activations): not supported")
        value = example_value(src)
        if isinstance(value, torch.Tensor):
            dim = value.dim() - (region.ndim - region.split_dim)
            if dim >= 0 and value.shape[dim] == region.heads != 1:
                chunks[src] = dim
    if chunks:
        node.meta[CHUNK] = chunks


# --- the pass --------------------------------------------------------------------------------------

def written_attention(ctx) -> None:
    for node in list(ctx.graph.nodes):
        if node.meta.get(RULE) == "written_attention":
            _rewrite(ctx, node)


def _rewrite(ctx, output) -> None:
    region, g = output.meta[REGION], ctx.graph
    scores, (q, kt, v) = region.scores, region.dims
    peeled = _peeled_kv(ctx, region)
    with g.inserting_before(scores):
        scores.replace_input_with(q, _heads_of(ctx, q, region))
        if peeled:
            keys = _heads_of(ctx, peeled[0], region, v, peeled[2], peeled[3])
            scores.replace_input_with(kt, g.call_method("transpose", (keys, -2, -1)))
        else:
            scores.replace_input_with(kt, _heads_of(ctx, kt, region, sent=_broadcast(ctx, region, kt)))
    with g.inserting_before(output):
        v_heads = _heads_of(ctx, peeled[1], region, v, peeled[2], peeled[3]) if peeled else \
            _heads_of(ctx, v, region, sent=_broadcast(ctx, region, v))
    output.replace_input_with(v, v_heads)
    if peeled:
        _erase_unread(g, kt), _erase_unread(g, v)
    chunks = {}
    for node in region.body:
        node.meta.pop(VALUE_OF, None)  # this rank's heads: no single-device value to compare with
        for src, dim in node.meta.get(CHUNK, {}).items():
            if (src, dim) not in chunks:
                with ctx.inserting_after(src):
                    chunks[src, dim] = g.call_function(HEAD_CHUNK, (src, dim, ctx.group, ctx.world_size))
                ctx.counters["head_chunk"] += 1
            node.replace_input_with(src, chunks[src, dim])
    output.meta.pop(VALUE_OF, None)
    with g.inserting_after(output):
        out = g.call_function(H2S, (output, *region.output_dims, region.heads, ctx.local_len(), ctx.group,
                                    ctx.world_size))
    output.replace_all_uses_with(out, delete_user_cb=lambda user: user is not out)
    stands_for(out, output)
    ctx.set_layout(out, SeqLayout(SHARDED, region.output_dims[0], 1, ctx.seq.symbol))
    for node in (*region.body, output):  # the region's marks hold nodes: not for the graph's copies
        for key in (REGION, CHUNK):
            node.meta.pop(key, None)
    ctx.counters["written_attention"] += 1
    ctx.counters["all_to_all"] += 4


def _peeled_kv(ctx, region):
    """(k, v, repeats sent, repeats after) where the model repeated each kv head n times before a
    matmul (HF's ``repeat_kv``) and k^T is the plain transpose of that: the all-to-all moves the
    distinct kv heads (each ``repeats sent`` times where there are fewer than ranks, as
    ``autosp.collectives.kv_repeats`` says) and this rank repeats its own ``repeats after`` times,
    which the model's grouping of query heads allows. None: move what the model gives."""
    (q, kt, v), nd = region.dims, region.ndim
    transposed = kt.op in ("call_method", "call_function") and kt.target in ("transpose", torch.transpose) \
        and len(kt.args) == 3 and {d % nd for d in kt.args[1:] if isinstance(d, int)} == {nd - 2, nd - 1}
    if _einsum(region.scores) is not None or not transposed or len(kt.users) != 1:
        return None
    peeled = [unrepeated(t, region.split_dim) for t in (kt.args[0], v)]
    if not (peeled[0] and peeled[1] and peeled[0][1] == peeled[1][1]) or \
            any(len(t.users) != 1 for t in (kt.args[0], v)):
        return None
    (k_source, n), (v_source, _) = peeled
    sent, grouped = kv_repeats(region.heads, region.heads // n, ctx.world_size, True)
    if not grouped:
        return None
    ctx.counters["kv_repeat_moved_after"] += 1
    return k_source, v_source, sent, n // sent


def _broadcast(ctx, region, operand) -> int:
    """How often to send each head of k^T or v: one key/value head the matmul broadcasts over the
    query heads (multi-query: Falcon) goes to every rank, as ``kv_repeats`` says."""
    if example_value(operand).shape[region.dims[operand][1]] == region.heads:
        return 1
    ctx.counters["kv_broadcast"] += 1
    return kv_repeats(region.heads, 1, ctx.world_size, True)[0]


def _erase_unread(g, node) -> None:
    """The model's repeat of the kv heads (and k^T of it), read by nothing once moved after."""
    if node.users:
        return
    inputs = [i for i in node.all_input_nodes if i.meta.get(REPEAT)]
    g.erase_node(node)
    for i in inputs:
        _erase_unread(g, i)


def _heads_of(ctx, x, region, like=None, sent: int = 1, after: int = 1) -> fx.Node:
    """``x`` (one of q, k^T, v, or ``like``'s layout: the kv heads before the model's repeat) as
    this rank's heads over the whole sequence, without the padding positions; each head sent
    ``sent`` times, then repeated ``after`` times in a row here."""
    g, (seq_dim, head_dim) = ctx.graph, region.dims[like if like is not None else x]
    heads = g.call_function(S2H, (x, seq_dim, head_dim, ctx.seq.node, ctx.group, ctx.world_size, sent))
    heads.meta["stack_trace"] = x.meta.get("stack_trace")
    if after > 1:
        heads = g.call_function(torch.repeat_interleave, (heads, after), {"dim": head_dim})
    return heads
