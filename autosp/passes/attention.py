"""Pass ``attention``: Ulysses all-to-all around every scaled_dot_product_attention.

q, k, v arrive sharded along the sequence ([..., H, S/P, D]); ``seq_to_head`` makes them
head-sharded over the whole (padded) sequence, attention runs on this rank's heads, and
``head_to_seq`` brings the result back. Key/value heads are repeated only as far as needed for
every rank to hold the kv heads of its query heads (GQA/MQA with fewer kv heads than ranks); kv
heads the model repeated itself before attention (HF's ``repeat_kv``) are moved before the repeat,
and attention groups the query heads instead (``enable_gqa``): the Ulysses minimum in bytes.
Query heads that P does not divide are padded with zero heads inside the all-to-all.
Where it costs little (``SPConfig(attention_output=...)``), the output is held once: the
all-to-all after attention is ``attention_to_seq``, which sends rowsum(dO * O) back with dO, and
attention saves no head-sharded copy of its output (``autosp::cpu_flash_attention``,
``masked_attention(..., lse_grad_is_delta=True)``).

Past the head count (fewer query heads than ranks, or ``SPConfig(ulysses=U)``), P = U x R: the
all-to-alls run within blocks of U ranks, ``gather_kv`` gathers keys and values over the R blocks,
and the blockwise attention below attends this rank's queries from their offset in the sequence
(``autosp.collectives.sp_degrees`` picks U; docs/usage.md).

The attention itself:
- ``is_causal`` without a mask: torch's attention, unchanged (padding sits at the end, where
  causal real queries never look);
- a mask, or neither mask nor ``is_causal``: ``autosp::masked_attention`` with the mask factored
  into O(S) leaves (``masks.py``), rebuilt one block of query rows at a time; padded keys are
  never attended. The [S, S] nodes that built the mask become dead and are removed. What cannot
  be factored is held whole (a warning and the ``dense_mask`` counter say so). A mask whose rows
  are runs at run time (causal, packed documents, padding: ``autosp::mask_key_ranges``, once per
  mask and step; HF builds one whenever it cannot prove under torch.compile that it needs none)
  takes torch's fused kernel, once per run (``autosp/mask_runs.py``);
- attention dropout: torch's attention with the whole mask, padded (``_padded_mask``).
"""
from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx

from autosp.collectives import kv_repeats, output_held_once, sp_degrees
from autosp.errors import AutoSPError
from autosp import flash_attention, mask_runs
from autosp.masked_attention import default_scale
from autosp.passes import masks
from autosp.passes.layout import RULE, SHARDED, SeqLayout, call_arg, example_value, source_line, stands_for

S2H, H2S = torch.ops.autosp.seq_to_head.default, torch.ops.autosp.head_to_seq.default
A2S = torch.ops.autosp.attention_to_seq.default
MASKED = torch.ops.autosp.masked_attention.default
FLASH = torch.ops.autosp.cpu_flash_attention.default
GATHER_KV = torch.ops.autosp.gather_kv.default
KEY_RANGES = torch.ops.autosp.mask_key_ranges.default


def attention(ctx) -> None:
    g = ctx.graph
    for node in list(g.nodes):
        if node.meta.get(RULE) != "sdpa":
            continue
        _rewrite(ctx, node)
    for node in reversed(list(g.nodes)):  # [S, S] mask values and kv repeats no attention reads any more
        if node.meta.get(REPEAT) and not node.users:
            g.erase_node(node)
        elif node in ctx.mask_region and not node.users:
            g.erase_node(node)
            ctx.counters["mask_nodes_removed"] += 1


def _broadcasts_one_kv_head(q, k, v, head_dim: int) -> bool:
    """SDPA broadcasts one key/value head over the query heads (multi-query without
    ``enable_gqa``: Falcon, GPTBigCode): grouped attention with one group, so that every rank
    gets that head (not a share of it, which the all-to-all would pad with a zero head)."""
    heads = [int(example_value(t).shape[head_dim]) for t in (q, k, v)]
    return heads[1] == heads[2] == 1 < heads[0]


def _degrees(ctx, node, q_heads: int, kv_heads: int) -> tuple[int, int]:
    """(U, R) for this attention: Ulysses over U ranks, keys and values gathered over R."""
    try:
        U, R = sp_degrees(q_heads, ctx.world_size, ctx.ulysses, kv_heads)
    except ValueError as exc:
        raise AutoSPError(f"attention {node.name}: {exc}\n  at {source_line(node)}") from None
    if R > 1:
        ctx.counters["kv_gathered"] += 1
        if ctx.ulysses is None and ctx.counters["kv_gathered"] == 1:  # said once per graph
            warnings.warn(f"autosp: attention {node.name} has {q_heads} query heads for {ctx.world_size} ranks: "
                          f"Ulysses over blocks of {U} ranks, keys and values gathered over {R} blocks "
                          f"(SPConfig(ulysses=...) fixes it)\n  at {source_line(node)}", stacklevel=4)
    return U, R


def _rewrite(ctx, node) -> None:
    P, g = ctx.world_size, ctx.graph
    q, k, v = (call_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    nd = example_value(q).dim()
    seq_dim, head_dim = nd - 2, nd - 3
    q_heads, kv_heads = int(example_value(q).shape[head_dim]), int(example_value(k).shape[head_dim])
    gqa = bool(call_arg(node, 7, "enable_gqa", False))
    peeled = [unrepeated(t, head_dim) for t in (k, v)]
    if not gqa and peeled[0] and peeled[1] and peeled[0][1] == peeled[1][1]:
        (k, rep), (v, _) = peeled  # move the distinct kv heads; attention groups the query heads
        kv_heads, gqa = kv_heads // rep, True
        ctx.counters["kv_repeat_moved_after"] += 1
    elif not gqa and _broadcasts_one_kv_head(q, k, v, head_dim):
        gqa = True
        ctx.counters["kv_broadcast"] += 1
    U, R = _degrees(ctx, node, q_heads, kv_heads if gqa else q_heads)
    repeats, gqa = kv_repeats(q_heads, kv_heads, U, gqa)
    mask, is_causal = call_arg(node, 3, "attn_mask"), bool(call_arg(node, 5, "is_causal", False))
    mask_value = example_value(mask) if mask is not None else None
    if isinstance(mask_value, torch.Tensor) and mask_value.dim() >= 3 and mask_value.shape[-3] != 1:
        raise AutoSPError(f"attention {node.name} has a per-head mask {tuple(mask_value.shape)}: "
                          f"not supported yet\n  at {source_line(node)}")
    dropout = call_arg(node, 4, "dropout_p", 0.0)
    block = (U,) if R > 1 else ()  # the all-to-alls' Ulysses degree, when it is not the whole group
    with g.inserting_before(node):
        kv_args = block
        if repeats > 1:  # each kv head repeated inside the all-to-all, not by graph ops (compile time)
            kv_args = (U if R > 1 else 0, repeats)
            ctx.counters["kv_repeat"] += 1
        q2 = g.call_function(S2H, (q, seq_dim, head_dim, ctx.group, P, *block))
        k2, v2 = (g.call_function(S2H, (t, seq_dim, head_dim, ctx.group, P, *kv_args)) for t in (k, v))
        for t in (q2, k2, v2):  # messages about the all-to-alls point at the attention call
            t.meta["stack_trace"] = node.meta.get("stack_trace")
        if R == 1:  # one block's heads over the whole sequence; with R > 1 nothing one device holds
            stands_for(q2, q)
            if repeats == 1:  # repeated kv heads hold no single-device value
                stands_for(k2, k), stands_for(v2, v)
        else:
            k2, v2 = (g.call_function(GATHER_KV, (t, seq_dim, ctx.group, P, U)) for t in (k2, v2))
            ctx.counters["all_gather"] += 2
        once = _held_once(ctx, q_heads, kv_heads * repeats, U, example_value(q))
        attn, lse = _attend(ctx, node, (q, q2, k2, v2), mask, is_causal, dropout, gqa, U, R, once)
        if lse is None:
            out = g.call_function(H2S, (attn, seq_dim, head_dim, q_heads, ctx.group, P, *block))
        else:  # the output held once: sequence-sharded (see autosp.collectives.ops.attention_to_seq)
            out = g.call_function(A2S, (attn, lse, seq_dim, head_dim, q_heads, ctx.group, P, *block))
            ctx.counters["attention_output_once"] += 1
        if R == 1:
            stands_for(attn, node)
        stands_for(out, node)
    ctx.set_layout(out, SeqLayout(SHARDED, seq_dim, 1, ctx.seq.symbol))
    node.replace_all_uses_with(out)
    g.erase_node(node)
    ctx.counters["all_to_all"] += 4
    ctx.counters["attention"] += 1


def _attend(ctx, node, qkv, mask, is_causal, dropout, gqa, U, R, once):
    """(output, log-sum-exp or None) of the attention of this rank's heads (``q`` as traced, then the
    all-to-alls' q, k, v): torch's for ``is_causal`` without a mask under plain Ulysses (its CPU
    flash kernel as ``autosp::cpu_flash_attention`` where it can, and, with the whole mask, for
    dropout), else ``autosp::masked_attention`` over the mask as O(S) data, from this rank's first
    query. With a log-sum-exp (``once``) the backward takes rowsum(dO * O) from
    ``attention_to_seq`` and saves no output."""
    g, (q, q2, k2, v2) = ctx.graph, qkv
    factored = None if (mask is None and is_causal and R == 1) else _factor(ctx, node, mask, dropout, R)
    if factored is None and R > 1:
        raise AutoSPError(f"attention {node.name}: its mask ({mask!r}) cannot be given per block of "
                          f"query rows, which keys and values gathered over {R} blocks need\n  at "
                          f"{source_line(node)}")
    if factored is None and once and not dropout and _cpu_flash(node):
        q_in, scale = _scaled_query(g, q2, call_arg(node, 6, "scale"))
        both = g.call_function(FLASH, (q_in, k2, v2, is_causal, scale))
        return g.call_function(operator.getitem, (both, 0)), g.call_function(operator.getitem, (both, 1))
    if factored is None:
        kwargs = dict(attn_mask=_padded_mask(ctx, mask), dropout_p=dropout, is_causal=is_causal,
                      scale=call_arg(node, 6, "scale"), enable_gqa=gqa)
        return g.call_function(node.target, (q2, k2, v2), kwargs), None
    q_in, scale = _scaled_query(g, q2, call_arg(node, 6, "scale"))
    scale = scale or default_scale(int(example_value(q).shape[-1]))
    if R > 1 and is_causal:  # torch's is_causal would align the wrong corner for queries not at 0
        factored = masks.causal()
    rows = (ctx.group, U) if R > 1 else ("", 0)  # where this rank's queries start
    fusable = ctx.attention_kernel == "auto" and _cpu_flash(node)
    ranges = _key_ranges(ctx, factored, mask) if fusable else None
    both = g.call_function(MASKED, (q_in, k2, v2, factored.leaves, factored.program,
                                    ctx.seq.node, float(scale), gqa, ctx.block_elements, *rows, ranges, once))
    ctx.counters["masked_attention"] += 1
    return g.call_function(operator.getitem, (both, 0)), g.call_function(operator.getitem, (both, 1)) if once else None


def _key_ranges(ctx, factored, mask):
    """``autosp::mask_key_ranges`` of a mask, one node per mask (every layer reads the same): a
    mask whose rows turn out to be runs at run time (HF builds one whenever it cannot prove it
    needs none: causal, packed documents, padding) gets torch's fused kernel, once per run. None
    for no mask, a batch size that is not a number, and where that kernel does not run (CPU only
    for now: ``autosp/mask_runs.py``), where the check would cost for nothing. Past the head
    count too (``is_causal`` there is ``masks.causal()``, whose ranges take O(S))."""
    value = example_value(mask) if isinstance(mask, fx.Node) else None
    batches = mask_runs.batches_of(value) if isinstance(value, torch.Tensor) else 1
    if factored.program == masks.NO_MASK.program or not isinstance(batches, int):
        return None
    key = (tuple(factored.leaves), factored.program)
    if key not in ctx.key_ranges:  # made before the first attention of the mask: every later one sees it
        ctx.key_ranges[key] = ctx.graph.call_function(KEY_RANGES, (factored.leaves, factored.program,
                                                                   ctx.seq.node, batches))
        ctx.counters["mask_key_ranges"] += 1
    return ctx.key_ranges[key]


def _scaled_query(g, q, scale):
    """(query, scale) for a kernel taking a constant scale. Dynamo makes a float symbolic once it
    has seen two values at one line (HF's attention: every model in a process with another head
    width): the query is multiplied by it instead."""
    if isinstance(scale, fx.Node):
        return g.call_function(operator.mul, (q, scale)), 1.0
    return q, scale


def _held_once(ctx, q_heads: int, kv_heads_sent: int, U: int, q) -> bool:
    """Whether the attention output is held once (``SPConfig.attention_output``)."""
    if ctx.attention_output != "auto":
        return ctx.attention_output == "once"
    return output_held_once(q_heads, kv_heads_sent, U, int(q.shape[-1]), q.element_size())


def _cpu_flash(node) -> bool:
    """Whether torch's CPU flash kernel runs this attention as ``autosp::cpu_flash_attention`` (on
    other devices torch's attention stays, and saves its output: docs/accounting.md)."""
    qkv = (example_value(call_arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    return flash_attention.runs(*qkv)


REPEAT = "autosp_kv_repeat"  # nodes of a peeled kv repeat: erased once nothing reads them
_VIEWS = ("reshape", "view", "flatten")


def unrepeated(node, head_dim: int):
    """``(source, n)`` when ``node`` is ``source`` with each head repeated ``n`` times in a row
    (HF's ``repeat_kv``: ``x[:, :, None].expand(b, h, n, s, d).reshape(b, h * n, s, d)``, or
    ``repeat_interleave(x, n, dim=1)``), else None. Moving ``source`` and letting attention
    group the query heads (``enable_gqa``) sends 1/n of the bytes, with the same values."""
    if not isinstance(node, fx.Node):
        return None
    out = example_value(node)
    if node.target == "repeat_interleave" or node.target is torch.repeat_interleave:
        src, n = node.args[0], call_arg(node, 1, "repeats")
        dim = call_arg(node, 2, "dim")
        if isinstance(src, fx.Node) and isinstance(n, int) and dim is not None and dim % out.dim() == head_dim:
            node.meta[REPEAT] = True
            return src, n
        return None
    if node.target not in _VIEWS or not isinstance(node.args[0], fx.Node):
        return None
    expand = node.args[0]
    if expand.target != "expand" or not isinstance(expand.args[0], fx.Node):
        return None
    inserted = expand.args[0]
    big, small = example_value(expand), example_value(inserted)
    if not (isinstance(big, torch.Tensor) and isinstance(small, torch.Tensor) and big.dim() == out.dim() + 1
            and small.dim() == big.dim() and small.shape[head_dim + 1] == 1):
        return None
    src = inserted.args[0] if inserted.target in (operator.getitem, "unsqueeze", torch.unsqueeze) else None
    if not isinstance(src, fx.Node) or example_value(src).dim() != out.dim():
        return None
    n = big.shape[head_dim + 1]
    same = [big.shape[i] == small.shape[i] for i in range(big.dim()) if i != head_dim + 1]
    if not (isinstance(n, int) and all(same) and tuple(src_shape := example_value(src).shape) ==
            tuple(small.shape[:head_dim + 1]) + tuple(small.shape[head_dim + 2:])
            and out.shape[head_dim] == src_shape[head_dim] * n):
        return None
    for part in (node, expand, inserted):
        part.meta[REPEAT] = True
    return src, n


def _factor(ctx, node, mask, dropout, kv_blocks: int = 1):
    """The mask of ``node`` as O(S) data where it can be (None: torch's attention with the whole
    mask, for dropout); a value held whole on every rank is said in a warning. With keys and
    values gathered over blocks (``kv_blocks`` > 1) only the blockwise op can attend this rank's
    queries: dropout is refused there."""
    if mask is not None and not isinstance(mask, fx.Node):
        return None
    if dropout and kv_blocks > 1:
        raise AutoSPError(f"attention {node.name} has dropout {dropout} with keys and values gathered over "
                          f"{kv_blocks} blocks (fewer query heads than ranks): not supported; set dropout to 0 "
                          f"or use at most as many ranks as query heads\n  at {source_line(node)}")
    if dropout:  # the blockwise op draws no dropout: keep torch's attention and the whole mask
        whole = {mask: f"attention dropout {dropout}"}
        factored = None
    else:
        factored = masks.factor(mask, ctx.seq.symbol) if mask is not None else masks.NO_MASK
        ctx.mask_region.update(factored.region)
        whole = factored.whole
    if whole:
        ctx.counters["dense_mask"] += 1
        why = "; ".join(whole.values())
        warnings.warn(f"autosp: attention {node.name} holds an [S, S] mask whole on every rank ({why})\n"
                      f"  at {source_line(node)}", stacklevel=2)
    return factored


def _padded_mask(ctx, mask):
    """A whole mask for the padded sequence: padded keys never visible, padded queries harmless.
    Only for masks that cannot be factored (``masks.py``) and for attention with dropout."""
    g, S = ctx.graph, ctx.seq.symbol
    value = example_value(mask) if mask is not None else None
    if not isinstance(value, torch.Tensor):
        return mask
    pad = ctx._emit("Sl*P-S", operator.sub, (ctx.padded_len(), ctx.seq.node))
    boolean = value.dtype == torch.bool
    has_seq = [S in s.node.expr.free_symbols if isinstance(s, torch.SymInt) else False for s in value.shape]
    if has_seq[-1]:
        mask = g.call_function(F.pad, (mask, (0, pad)), {"value": False if boolean else float("-inf")})
    if len(value.shape) >= 2 and has_seq[-2]:
        mask = g.call_function(F.pad, (mask, (0, 0, 0, pad)), {"value": True if boolean else 0.0})
    return mask
