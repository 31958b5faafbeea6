"""Ulysses attention for eager modules: every ``scaled_dot_product_attention`` call made inside a
sharded block runs on the full sequence with this rank's share of the heads.

q, k and v arrive as this rank's sequence chunk ``[B, H, local_len, D]``; an all-to-all (autosp's
``seq_to_head``, with autograd) makes them ``[B, ceil(H/P), padded_len, D]``; attention runs there;
``head_to_seq`` brings the output back. Head counts P does not divide are padded with zero heads;
grouped kv heads that do not split evenly are repeated to the query heads first. With no mask, no
segments and no sequence padding, torch's attention runs as called; otherwise
``autosp::masked_attention`` applies the model's mask (sliced per block of query rows, never
copied or padded), a block adapter's segments (O(S) ids: images attend within themselves) and
causality (from positions), and never attends padded keys; padded query rows give zeros.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from autosp import collectives
from autosp import flash_attention, mask_runs
from autosp.collectives import ChunkLayout, kv_repeats, output_held_once, pad_to, sp_degrees
from autosp.errors import AutoSPError
from autosp.masked_attention import (DEFAULT_BLOCK_ELEMENTS, Block, ProgramBuilder, default_scale, evaluate,
                                     program_of)


@dataclass
class BlockContext:
    """What the attention inside one running block needs to know."""
    name: str
    layout: ChunkLayout
    group: dist.ProcessGroup
    causal_hint: bool = False             # the block's attention module says it is causal
    segments: torch.Tensor | None = None  # [S] ids from a block adapter: attend within a segment (images)
    seq_dim: int | None = None             # the sequence dim of the block's hidden states
    hidden_ndim: int | None = None
    sdpa_calls: int = field(default=0)


class UlyssesMode(TorchFunctionMode):
    """Active while a sharded block runs: reroutes SDPA through :func:`ulysses_sdpa`."""

    def __init__(self, context: BlockContext):
        super().__init__()
        self.context = context

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.context.sdpa_calls += 1
            return ulysses_sdpa(self.context, *args, **kwargs)
        _refuse_sequence_mixing(self.context, func, args, kwargs)
        return func(*args, **kwargs)


# Ops that combine neighbouring positions: on a chunk they would miss the other ranks' positions.
_MIXING = {torch.roll, torch.cumsum, torch.cumprod, torch.Tensor.roll, torch.Tensor.cumsum, torch.Tensor.cumprod,
           F.conv1d, F.conv2d, F.conv3d, F.avg_pool1d, F.avg_pool2d, F.max_pool1d, F.max_pool2d, F.interpolate,
           F.adaptive_avg_pool1d, F.adaptive_avg_pool2d}
# Reductions: refused when they reduce the sequence dim of a value shaped like the hidden states.
_REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.logsumexp, torch.softmax,
               torch.Tensor.mean, torch.Tensor.sum, torch.Tensor.amax, torch.Tensor.amin, torch.Tensor.max,
               torch.Tensor.min, torch.Tensor.logsumexp, torch.Tensor.softmax, F.softmax, torch.var, torch.std,
               torch.Tensor.var, torch.Tensor.std}


def _refuse_sequence_mixing(ctx: BlockContext, func, args, kwargs) -> None:
    if ctx.seq_dim is None or ctx.layout.world_size == 1 or not args or not isinstance(args[0], torch.Tensor):
        return
    x, local = args[0], ctx.layout.local_len
    name = getattr(func, "__name__", str(func))
    if func in _MIXING and local in x.shape[1:]:
        raise AutoSPError(f"{ctx.name}: {name} on {tuple(x.shape)} inside a sequence-sharded layer may combine "
                          f"neighbouring positions, and this rank holds only {local} of {ctx.layout.length}; "
                          "AutoSP cannot shard this layer exactly")
    if func in _REDUCTIONS and x.dim() == ctx.hidden_ndim and x.shape[ctx.seq_dim] == local:
        dim = kwargs.get("dim", args[1] if len(args) > 1 and isinstance(args[1], (int, tuple, list)) else None)
        dims = [] if dim is None else ([dim] if isinstance(dim, int) else list(dim))
        if dim is None and func not in (torch.softmax, torch.Tensor.softmax, F.softmax) or \
                any(d % x.dim() == ctx.seq_dim for d in dims):
            raise AutoSPError(f"{ctx.name}: {name} over the sequence dim {ctx.seq_dim} of {tuple(x.shape)} "
                              f"inside a sequence-sharded layer would see {local} of {ctx.layout.length} "
                              "positions; AutoSP cannot shard this layer exactly")


def _rank_mask(mask: torch.Tensor, layout: ChunkLayout, heads_per_rank: int, num_heads: int) -> torch.Tensor:
    """A mask given for the full sequence, cut to this rank's heads (a per-head mask)."""
    if mask.shape[-1] != layout.length or (mask.dim() >= 2 and mask.shape[-2] not in (1, layout.length)):
        raise AutoSPError(
            f"attention mask of shape {tuple(mask.shape)} inside a sharded block: expected one for the full "
            f"sequence (last dims [{layout.length}, {layout.length}]); a mask built inside the layer from "
            "the local length cannot be used")
    if mask.dim() == 4 and mask.shape[1] == num_heads and num_heads > 1:
        mask = pad_to(mask, 1, heads_per_rank * layout.world_size)
        mask = mask.narrow(1, layout.rank * heads_per_rank, heads_per_rank)
    return mask


def _mask_program(mask, segments, is_causal: bool) -> tuple[list, str | None]:
    """(leaves, program) of the mask attention applies: the model's mask, the block adapter's
    segments (positions attend within their segment), causality; None when there is none. Never
    an [S, S] tensor beyond the one the model passed."""
    leaves, q_dims = [], []
    if mask is not None:
        leaves.append(mask)
        q_dims.append(mask.dim() - 2 if mask.dim() >= 2 and mask.shape[-2] != 1 else -1)
    if segments is not None:
        leaves += [segments[:, None], segments[None, :]]
        q_dims += [0, -1]
    program = ProgramBuilder(q_dims)
    value = program.leaf(0) if mask is not None else None
    boolean = mask is None or mask.dtype == torch.bool
    allowed = []
    if segments is not None:
        allowed.append(program.emit("eq", [program.leaf(len(leaves) - 2), program.leaf(len(leaves) - 1)]))
    if is_causal:
        allowed.append(program.emit("le", [program.positions("cols"), program.positions("rows")]))
    for a in allowed:
        if value is None or boolean:
            value = a if value is None else program.emit("and", [value, a])
        else:  # an additive mask: what is not allowed gets -inf
            value = program.emit("where", [a, value, {"float": "-inf"}])
    if value is None:
        return leaves, None
    return leaves, program.program(value)


def _dense(leaves, program, layout: ChunkLayout, device) -> torch.Tensor:
    """The whole mask over the padded sequence (padded keys masked, padded query rows allowed
    every key so they stay finite): only for attention dropout, which the blockwise op lacks."""
    mask = evaluate(program, leaves, Block(0, layout.length, layout.length, device)) if program else None
    if mask is None:
        mask = torch.ones(layout.length, dtype=torch.bool, device=device)
    masked, allowed = (False, True) if mask.dtype == torch.bool else (float("-inf"), 0.0)
    padded = pad_to(mask, -1, layout.padded_len, masked)
    return padded if mask.dim() == 1 or mask.shape[-2] == 1 else pad_to(padded, -2, layout.padded_len, allowed)


def ulysses_sdpa(ctx: BlockContext, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False):
    layout, world = ctx.layout, ctx.layout.world_size
    if query.dim() != 4 or query.shape[2] != layout.local_len:
        raise AutoSPError(
            f"{ctx.name}: scaled_dot_product_attention got query {tuple(query.shape)}; expected "
            f"[batch, heads, {layout.local_len}, head_dim] (this rank's {layout.local_len} of {layout.length} "
            "positions): the block computes attention over something other than its hidden states")
    if dropout_p:
        warnings.warn(f"{ctx.name}: attention dropout {dropout_p} under sequence parallelism draws other "
                      "random numbers than one device; results are not comparable", stacklevel=3)
    num_heads, kv_heads = query.shape[1], key.shape[1]
    grouped = enable_gqa or kv_heads != num_heads
    # past the head count, Ulysses within blocks of U ranks and keys/values gathered over R (the passes' choice)
    U, R = sp_degrees(num_heads, world, None, kv_heads if grouped else num_heads)
    # grouped kv heads must land on the rank of their query heads: the passes' policy
    repeats, enable_gqa = kv_repeats(num_heads, kv_heads, U, grouped)
    if (ctx.causal_hint and attn_mask is None and not is_causal and layout.local_len == 1
            and layout.length > 1):
        is_causal = True  # HF decides "causal" from the query length, which is the local one here
    gkey = collectives.group_key(ctx.group)
    block = (U,) if R > 1 else ()
    q = collectives.seq_to_head(query, 2, 1, gkey, world, *block)
    k, v = (collectives.seq_to_head(t, 2, 1, gkey, world, U if R > 1 else 0, repeats) for t in (key, value))
    if R > 1:
        if dropout_p:
            raise AutoSPError(f"{ctx.name}: attention dropout {dropout_p} with {num_heads} query heads over "
                              f"{world} ranks (keys and values gathered over {R} blocks): not supported")
        k, v = (collectives.gather_kv(t, 2, gkey, world, U) for t in (k, v))
    heads_per_rank = q.shape[1]
    mask = None if attn_mask is None else _rank_mask(attn_mask, layout, heads_per_rank, num_heads)
    padded = layout.padded_len != layout.length
    # the output held once where it costs little (the passes' SPConfig(attention_output="auto"))
    once = not dropout_p and output_held_once(num_heads, key.shape[1], U, query.shape[-1], query.element_size())
    if mask is None and ctx.segments is None and not padded and R == 1:  # torch's kernels, is_causal or not
        if once and flash_attention.runs(q, k, v):
            out, lse = torch.ops.autosp.cpu_flash_attention(q, k, v, is_causal, scale)
            return collectives.attention_to_seq(out, lse, 2, 1, num_heads, gkey, world)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                                             enable_gqa=enable_gqa)
        return collectives.head_to_seq(out, 2, 1, num_heads, gkey, world)
    leaves, program = _mask_program(mask, ctx.segments, is_causal)
    if dropout_p:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense(leaves, program, layout, q.device),
                                             dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa)
    else:
        rows = (gkey, U) if R > 1 else ("", 0)  # where this rank's queries start in the sequence
        program = program or program_of([], [])
        # a mask whose rows are runs (causal, packed documents, padding) takes torch's fused kernel
        batches = mask_runs.batches_of(mask) if mask is not None else 1
        ranges = mask_runs.mask_key_ranges(leaves, program, layout.length, batches) \
            if flash_attention.runs(q, k, v) else None
        out, lse = torch.ops.autosp.masked_attention(
            q, k, v, leaves, program, layout.length,
            scale if scale is not None else default_scale(q.shape[-1]), enable_gqa, DEFAULT_BLOCK_ELEMENTS,
            *rows, ranges, once)
        if once:
            return collectives.attention_to_seq(out, lse, 2, 1, num_heads, gkey, world, *block)
    return collectives.head_to_seq(out, 2, 1, num_heads, gkey, world, *block)


class UlyssesSPViTAttention(nn.Module):
    """A ViT (or any) attention module made sequence parallel, for manual use.

    ``attn`` maps hidden states ``[B, S, D]`` to ``[B, S, D]`` (or a tuple whose first item is that)
    and computes attention with ``F.scaled_dot_product_attention``. Two input layouts:

    - ``has_cls_token=True`` (the default, DeepSpeed's layout): every rank holds the class token
      first, then its contiguous chunk of the patches: ``[B, 1 + local, D]``. Attention runs over
      the class token and all patches once (the patches are gathered, the sequence resharded for
      Ulysses, the output gathered back: three collectives more than the layout below); every
      rank returns the class token's output and its own patches'. Ranks whose first position
      differs are refused (that is the other layout).
    - ``has_cls_token=False``: the class token (if any) is an ordinary position of the sharded
      sequence; the input is this rank's chunk only (shard with ``autosp.collectives.shard_chunk``,
      which pads the end).

    ``length`` is the number of positions the chunks hold in all (patches only with a class
    token); pass it when the chunks are padded. :func:`auto_wrap_model_for_sp` does not need this
    class: it shards whole layers in place.
    """

    def __init__(self, attn: nn.Module, process_group, has_cls_token: bool = True, causal: bool = False):
        super().__init__()
        self.attn, self.process_group, self.has_cls_token = attn, process_group, has_cls_token
        self.causal = causal

    def forward(self, hidden_states, *args, length: int | None = None, **kwargs):
        if self.has_cls_token:
            return self._with_class_token(hidden_states, args, length, kwargs)
        return self._attend(hidden_states, args, length, kwargs)

    def _layout(self, local: int, length: int | None, what: str) -> ChunkLayout:
        world = dist.get_world_size(self.process_group)
        layout = ChunkLayout.of(length if length is not None else local * world, self.process_group)
        if local != layout.local_len:
            raise AutoSPError(f"UlyssesSPViTAttention: rank {layout.rank} holds {local} {what}; a sequence of "
                              f"{layout.length} over {world} ranks needs {layout.local_len} each")
        return layout

    def _attend(self, hidden_states, args, length, kwargs):
        layout = self._layout(hidden_states.shape[1], length, "positions")
        context = BlockContext(type(self.attn).__name__, layout, self.process_group, causal_hint=self.causal)
        with UlyssesMode(context):
            out = self.attn(hidden_states, *args, **kwargs)
        if context.sdpa_calls == 0:
            raise AutoSPError(f"{type(self.attn).__name__} did not call scaled_dot_product_attention; "
                              "use an SDPA attention implementation (HF: attn_implementation='sdpa')")
        return out

    def _with_class_token(self, hidden_states, args, length, kwargs):
        group = self.process_group
        cls, patches = hidden_states[:, :1], hidden_states[:, 1:]
        firsts = collectives.gather_sequence(cls.detach(), 1, group)  # [B, P, D]: one class token per rank
        differ = [r for r in range(firsts.shape[1]) if not torch.equal(firsts[:, r:r + 1], firsts[:, :1])]
        if differ:
            raise AutoSPError(f"UlyssesSPViTAttention(has_cls_token=True): ranks {differ} hold a first position "
                              "other than rank 0's; this layout needs the class token first on every rank. "
                              "For a class token sharded as an ordinary position, pass has_cls_token=False")
        patch_layout = self._layout(patches.shape[1], length, "patches")
        whole = torch.cat([cls, collectives.gather_chunks(patches, 1, patch_layout, group)], 1)
        seq_layout = ChunkLayout.of(whole.shape[1], group)
        out = self._attend(collectives.shard_chunk(whole, 1, seq_layout, group), args, seq_layout.length, kwargs)
        first, extra = (out[0], tuple(out[1:])) if isinstance(out, (tuple, list)) else (out, ())
        out_whole = collectives.gather_chunks(first, 1, seq_layout, group)
        local = torch.cat([out_whole[:, :1], collectives.shard_chunk(out_whole[:, 1:], 1, patch_layout, group)], 1)
        return (local, *extra) if extra else local
