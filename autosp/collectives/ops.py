"""The custom ops of sequence parallelism, with autograd, and the eager helpers.

Every op reads the rank from its group at run time (``groups.resolve_group``), so one compiled
graph serves every rank. Each op has a fake (meta) implementation for tracing and an autograd
formula (the inverse collective).

Sequence layout arguments, shared by several ops: ``dim`` is the tensor dim that carries the
sequence, ``inner`` the number of elements of that dim that follow each sequence position (1
unless the sequence was flattened together with later dims, e.g. ``[B*S]`` has inner 1 and
``[B*S*H]`` inner H), so ``x.size(dim) == outer * length * inner``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from autosp.collectives.groups import check_device, count, group_key, resolve_group


def _rank(key: str) -> int:
    return dist.get_rank(resolve_group(key))


def _split_seq(x: Tensor, dim: int, inner: int, length: int) -> Tensor:
    """View ``x`` with its sequence dim split into (outer, length, inner)."""
    shape = list(x.shape)
    outer = shape[dim] // (length * inner)
    return x.reshape(shape[:dim] + [outer, length, inner] + shape[dim + 1:])


# --- shard: full value -> this rank's chunk (padded to local_len * world_size) -------------------

@torch.library.custom_op("autosp::shard", mutates_args=())
def shard(x: Tensor, dim: int, inner: int, length: int, local_len: int, pad_value: float,
          group: str, world_size: int) -> Tensor:
    """This rank's ``local_len`` positions of the sequence of ``x``; past ``length``: ``pad_value``."""
    rank = _rank(group)
    split = _split_seq(x, dim, inner, length)
    padded_len = local_len * world_size
    split = pad_to(split, dim + 1, padded_len, pad_value)
    chunk = split.narrow(dim + 1, rank * local_len, local_len)
    out_shape = list(x.shape)
    out_shape[dim] = out_shape[dim] // length * local_len
    return chunk.reshape(out_shape).clone()


@shard.register_fake
def _(x, dim, inner, length, local_len, pad_value, group, world_size):
    out_shape = list(x.shape)
    out_shape[dim] = out_shape[dim] // length * local_len
    return x.new_empty(out_shape)


@torch.library.custom_op("autosp::unshard_grad", mutates_args=())
def unshard_grad(grad: Tensor, dim: int, inner: int, length: int, local_len: int,
                 group: str, world_size: int) -> Tensor:
    """Backward of shard: this rank's chunk of the gradient placed in a zero full-size tensor."""
    rank = _rank(group)
    split = _split_seq(grad, dim, inner, local_len)
    shape = list(split.shape)
    shape[dim + 1] = local_len * world_size
    full = split.new_zeros(shape)
    full.narrow(dim + 1, rank * local_len, local_len).copy_(split)
    full = full.narrow(dim + 1, 0, length)
    out_shape = list(grad.shape)
    out_shape[dim] = out_shape[dim] // local_len * length
    return full.reshape(out_shape)


@unshard_grad.register_fake
def _(grad, dim, inner, length, local_len, group, world_size):
    out_shape = list(grad.shape)
    out_shape[dim] = out_shape[dim] // local_len * length
    return grad.new_empty(out_shape)


def _shard_setup(ctx, inputs, output):
    _, ctx.dim, ctx.inner, ctx.length, ctx.local_len, _, ctx.group, ctx.world_size = inputs


def _shard_backward(ctx, grad):
    return (unshard_grad(grad, ctx.dim, ctx.inner, ctx.length, ctx.local_len, ctx.group,
                         ctx.world_size), None, None, None, None, None, None, None)


shard.register_autograd(_shard_backward, setup_context=_shard_setup)


# --- mask_padding: zero the positions past the logical length (before reductions) -----------------

@torch.library.custom_op("autosp::mask_padding", mutates_args=())
def mask_padding(x: Tensor, dim: int, inner: int, length: int, local_len: int,
                 group: str) -> Tensor:
    """``x`` (a local chunk) with positions whose global index is >= ``length`` set to zero."""
    valid = max(0, min(local_len, length - _rank(group) * local_len))
    split = _split_seq(x, dim, inner, local_len).clone()
    split.narrow(dim + 1, valid, local_len - valid).zero_()
    return split.reshape(x.shape)


@mask_padding.register_fake
def _(x, dim, inner, length, local_len, group):
    return torch.empty_like(x)


def _mask_setup(ctx, inputs, output):
    _, ctx.dim, ctx.inner, ctx.length, ctx.local_len, ctx.group = inputs


def _mask_backward(ctx, grad):
    return (mask_padding(grad, ctx.dim, ctx.inner, ctx.length, ctx.local_len, ctx.group),
            None, None, None, None, None)


mask_padding.register_autograd(_mask_backward, setup_context=_mask_setup)


# --- all-to-all: sequence-sharded <-> head-sharded -------------------------------------------------
#
# Two-level layouts (P = U x R, ``ulysses`` = U < P): rank r = g*U + u holds sequence chunk r, so
# the U ranks of block g (its Ulysses peers) hold a contiguous super-chunk g; their all-to-all
# gives each the super-chunk for 1/U of the heads. The R ranks with the same u (its kv peers) hold
# the same heads for every super-chunk: ``gather_kv`` gathers keys and values over them. Both run
# as one all-to-all over the whole group in which a rank sends only to its peers.

def ulysses_peers(rank: int, world_size: int, ulysses: int) -> list[int]:
    """The ranks of ``rank``'s Ulysses block (all of them when ``ulysses`` is 0 or P)."""
    u = ulysses or world_size
    first = rank - rank % u
    return list(range(first, first + u))


def kv_peers(rank: int, world_size: int, ulysses: int) -> list[int]:
    """The ranks holding ``rank``'s heads for every super-chunk, in sequence order."""
    u = ulysses or world_size
    return list(range(rank % u, world_size, u))


def _all_to_all(x: Tensor, group: str, kind: str = "all_to_all", peers: list[int] | None = None) -> Tensor:
    """all_to_all over dim 0 of a contiguous tensor whose dim 0 is the world size, or the number of
    ``peers`` (x[i] goes to peers[i], out[i] comes from it; nothing is sent to other ranks)."""
    pg = resolve_group(group)
    x = x.contiguous()
    check_device(x, pg, kind)
    out = torch.empty_like(x)  # contiguous too: backends write the buffer in rank-major order
    size = dist.get_world_size(pg)
    n = size if peers is None else len(peers)
    count(kind, x, x.numel() * x.element_size() * (n - 1) / n)  # x[i] for each peer, one of them itself
    if peers is None or len(peers) == size:
        dist.all_to_all_single(out, x, group=pg)
    else:
        splits = [0] * size
        for p in peers:
            splits[p] = 1
        dist.all_to_all_single(out, x, output_split_sizes=splits, input_split_sizes=splits, group=pg)
    return out


@torch.library.custom_op("autosp::seq_to_head", mutates_args=())
def seq_to_head(x: Tensor, seq_dim: int, head_dim: int, group: str, world_size: int, ulysses: int = 0,
                repeats: int = 1) -> Tensor:
    """[.., H, .., S/P, ..] -> [.., ceil(H/U), .., U*S/P, ..]: gather the sequence of this rank's
    Ulysses block (U = ``ulysses``, default the world size: the whole sequence), scatter the heads.

    Heads are padded with zeros up to a multiple of U (attention is independent per head, so zero
    heads never touch real ones; head_to_seq drops them again). ``repeats`` > 1: each head is sent
    that many times in a row (H becomes H * repeats: grouped kv heads for more ranks than there
    are of them), as ``repeat_interleave`` would make them; in the op, not in the graph, because
    the compile traces every graph op at a cost (the backward sums the copies' gradients).
    """
    u = ulysses or world_size
    if repeats > 1:
        x = x.repeat_interleave(repeats, dim=head_dim)
    canon = x.movedim((head_dim, seq_dim), (0, 1))
    heads, local_len = canon.shape[0], canon.shape[1]
    per_rank = -(-heads // u)
    if per_rank * u != heads:
        pad = canon.new_zeros((per_rank * u - heads, *canon.shape[1:]))
        canon = torch.cat([canon, pad], 0)
    chunks = canon.reshape(u, per_rank, *canon.shape[1:])
    peers = ulysses_peers(_rank(group), world_size, u)
    received = _all_to_all(chunks, group, peers=peers)  # [source rank, heads, S/P, ...]
    gathered = received.transpose(0, 1).reshape(per_rank, u * local_len, *canon.shape[2:])
    return gathered.movedim((0, 1), (head_dim, seq_dim)).contiguous()


@seq_to_head.register_fake
def _s2h_fake(x, seq_dim, head_dim, group, world_size, ulysses=0, repeats=1):
    u = ulysses or world_size
    shape = list(x.shape)
    shape[head_dim] = -(-shape[head_dim] * repeats // u)
    shape[seq_dim] = shape[seq_dim] * u
    return x.new_empty(shape)


@torch.library.custom_op("autosp::head_to_seq", mutates_args=())
def head_to_seq(x: Tensor, seq_dim: int, head_dim: int, num_heads: int, group: str,
                world_size: int, ulysses: int = 0, repeats: int = 1) -> Tensor:
    """Inverse of seq_to_head: [.., ceil(H/U), .., U*S/P, ..] -> [.., H, .., S/P, ..]. ``repeats`` > 1:
    the heads arrive as seq_to_head sent them, each ``repeats`` times in a row, and each run is
    summed into one head (H = ``num_heads`` distinct ones): seq_to_head's gradient."""
    u = ulysses or world_size
    canon = x.movedim((head_dim, seq_dim), (0, 1))
    per_rank, block_len = canon.shape[0], canon.shape[1]
    local_len = block_len // u
    chunks = canon.reshape(per_rank, u, local_len, *canon.shape[2:]).transpose(0, 1)
    peers = ulysses_peers(_rank(group), world_size, u)
    received = _all_to_all(chunks, group, peers=peers)  # [source rank, its heads, my S/P, ...]
    heads = received.reshape(u * per_rank, local_len, *canon.shape[2:])[:num_heads * repeats]
    if repeats > 1:
        heads = heads.unflatten(0, (num_heads, repeats)).sum(1)
    return _sequence_major(heads.movedim((0, 1), (head_dim, seq_dim)), seq_dim, head_dim)


@head_to_seq.register_fake
def _h2s_fake(x, seq_dim, head_dim, num_heads, group, world_size, ulysses=0, repeats=1):
    return _sequence_major_empty(x, num_heads, x.shape[seq_dim] // (ulysses or world_size), seq_dim, head_dim)


def _sequence_major_empty(x: Tensor, num_heads, local_len, seq_dim: int, head_dim: int) -> Tensor:
    """A new tensor like ``x`` with ``num_heads`` heads and ``local_len`` positions, laid out as
    _sequence_major lays it out, made in one op (a permute of a new tensor costs 3x as much to
    trace with a symbolic sequence, and the compile traces this for every attention)."""
    shape = list(x.shape)
    shape[head_dim], shape[seq_dim] = num_heads, local_len
    strides, step = [0] * len(shape), 1
    for d in reversed(_swap(len(shape), seq_dim, head_dim)):
        strides[d], step = step, step * shape[d]
    return x.new_empty_strided(shape, strides)


def _swap(ndim: int, seq_dim: int, head_dim: int) -> list[int]:
    """The dim order with the sequence before the heads (a swap: its own inverse)."""
    order = list(range(ndim))
    if head_dim < seq_dim:
        order[head_dim], order[seq_dim] = seq_dim, head_dim
    return order


def _sequence_major(x: Tensor, seq_dim: int, head_dim: int) -> Tensor:
    """``x`` with the sequence dim laid out before the head dim in memory ([B, S, H, D] under a
    [B, H, S, D] view, as CUDA's flash attention returns it): the usual ``transpose(1, 2)`` +
    reshape to [B, S, H*D] after attention is then a view, so the attention output is held once,
    not once here and again as the projection's input."""
    order = _swap(x.dim(), seq_dim, head_dim)
    return x.permute(order).contiguous().permute(order)


def _s2h_setup(ctx, inputs, output):
    x, ctx.seq_dim, ctx.head_dim, ctx.group, ctx.world_size, ctx.ulysses, ctx.repeats = inputs  # defaults filled in
    ctx.num_heads = x.shape[ctx.head_dim]


def _s2h_backward(ctx, grad):
    full = head_to_seq(grad, ctx.seq_dim, ctx.head_dim, ctx.num_heads, ctx.group, ctx.world_size, ctx.ulysses,
                       ctx.repeats)
    return (full,) + (None,) * 6


def _h2s_setup(ctx, inputs, output):
    _, ctx.seq_dim, ctx.head_dim, _, ctx.group, ctx.world_size, ctx.ulysses, ctx.repeats = inputs  # defaults filled in


def _h2s_backward(ctx, grad):
    full = seq_to_head(grad, ctx.seq_dim, ctx.head_dim, ctx.group, ctx.world_size, ctx.ulysses, ctx.repeats)
    return (full,) + (None,) * 7


seq_to_head.register_autograd(_s2h_backward, setup_context=_s2h_setup)
head_to_seq.register_autograd(_h2s_backward, setup_context=_h2s_setup)


# --- the same all-to-alls without the padding positions (attention written out) -------------------
#
# Attention written out runs the model's own ops on the heads, whose sizes are the model's: S, not
# the padded P * ceil(S/P). The padding is cut off (and put back) inside the ops, where the compile
# never compares S with the padded length (a graph op would have it guard on their equality).

@torch.library.custom_op("autosp::seq_to_head_whole", mutates_args=())
def seq_to_head_whole(x: Tensor, seq_dim: int, head_dim: int, length: int, group: str, world_size: int,
                      repeats: int = 1) -> Tensor:
    """seq_to_head (each head sent ``repeats`` times), then the first ``length`` positions (the
    sequence without its padding)."""
    heads = seq_to_head(x, seq_dim, head_dim, group, world_size, 0, repeats)
    return heads.narrow(seq_dim, 0, length).contiguous()


@seq_to_head_whole.register_fake
def _(x, seq_dim, head_dim, length, group, world_size, repeats=1):
    shape = list(x.shape)
    shape[head_dim] = -(-shape[head_dim] * repeats // world_size)
    shape[seq_dim] = length
    return x.new_empty(shape)


@torch.library.custom_op("autosp::head_whole_to_seq", mutates_args=())
def head_whole_to_seq(x: Tensor, seq_dim: int, head_dim: int, num_heads: int, local_len: int, group: str,
                      world_size: int, repeats: int = 1) -> Tensor:
    """Inverse of seq_to_head_whole: the padding positions put back (zeros), then head_to_seq
    (``repeats`` > 1: each run of copies summed into one head, seq_to_head_whole's gradient)."""
    padded = pad_to(x, seq_dim, local_len * world_size)
    return head_to_seq(padded, seq_dim, head_dim, num_heads, group, world_size, 0, repeats)


@head_whole_to_seq.register_fake
def _(x, seq_dim, head_dim, num_heads, local_len, group, world_size, repeats=1):
    return _sequence_major_empty(x, num_heads, local_len, seq_dim, head_dim)


def _s2hw_setup(ctx, inputs, output):
    x, ctx.seq_dim, ctx.head_dim, _, ctx.group, ctx.world_size, ctx.repeats = inputs  # defaults filled in
    ctx.num_heads, ctx.local_len = x.shape[ctx.head_dim], x.shape[ctx.seq_dim]


def _s2hw_backward(ctx, grad):
    return (head_whole_to_seq(grad, ctx.seq_dim, ctx.head_dim, ctx.num_heads, ctx.local_len, ctx.group,
                              ctx.world_size, ctx.repeats),) + (None,) * 6


def _hw2s_setup(ctx, inputs, output):
    x, ctx.seq_dim, ctx.head_dim, _, _, ctx.group, ctx.world_size, ctx.repeats = inputs  # defaults filled in
    ctx.length = x.shape[ctx.seq_dim]


def _hw2s_backward(ctx, grad):
    return (seq_to_head_whole(grad, ctx.seq_dim, ctx.head_dim, ctx.length, ctx.group, ctx.world_size,
                              ctx.repeats),) + (None,) * 7


seq_to_head_whole.register_autograd(_s2hw_backward, setup_context=_s2hw_setup)
head_whole_to_seq.register_autograd(_hw2s_backward, setup_context=_hw2s_setup)


# --- attention_to_seq: head_to_seq of an attention output that is held once -------------------------
#
# An attention's backward reads its output only for D = rowsum(dO * O) per query row and head.
# Saved head-sharded for that, the output would be held twice on a rank: there, and
# sequence-sharded after the all-to-all as the output projection's input. ``attention_to_seq``
# keeps only the second: its backward computes D from the output it returned and sends it back
# with dO (one all-to-all, H values per position more), as the gradient of the attention's
# log-sum-exp; the attention ops that take part (``autosp::cpu_flash_attention``,
# ``autosp::masked_attention(..., lse_grad_is_delta=True)``) read it as D and save no output.

@torch.library.custom_op("autosp::attention_to_seq", mutates_args=())
def attention_to_seq(out: Tensor, lse: Tensor, seq_dim: int, head_dim: int, num_heads: int, group: str,
                     world_size: int, ulysses: int = 0) -> Tensor:
    """head_to_seq of the output ``out`` [.., H/U, .., S*, D] of an attention whose log-sum-exp is
    ``lse`` [.., H/U, .., S*] (not read: only its gradient matters, D as above)."""
    return head_to_seq(out, seq_dim, head_dim, num_heads, group, world_size, ulysses)


@attention_to_seq.register_fake
def _(out, lse, seq_dim, head_dim, num_heads, group, world_size, ulysses=0):
    return _h2s_fake(out, seq_dim, head_dim, num_heads, group, world_size, ulysses)  # not the op: one dispatch less


def _a2s_setup(ctx, inputs, output):
    _, lse, ctx.seq_dim, ctx.head_dim, _, ctx.group, ctx.world_size, *rest = inputs
    ctx.ulysses = rest[0] if rest else 0
    ctx.delta_dtype = lse.dtype
    ctx.save_for_backward(output)


@torch.library.custom_op("autosp::attention_to_seq_backward", mutates_args=())
def attention_to_seq_backward(grad: Tensor, out: Tensor, work: torch.dtype, seq_dim: int, head_dim: int, group: str,
                              world_size: int, ulysses: int = 0) -> tuple[Tensor, Tensor]:
    """attention_to_seq's backward: (dO, D) by head, D = rowsum(dO * O) in ``work`` (the attention's
    accumulation dtype: float32 for half precision). One op, so that a compiled backward traces
    one node here, not each op of the packing."""
    delta = (grad.to(work) * out.to(work)).sum(-1, keepdim=True)
    ratio = work.itemsize // grad.dtype.itemsize  # D travels bitwise in grad's dtype, beside dO
    packed = torch.cat([grad, delta.view(grad.dtype)], -1)
    full = seq_to_head(packed, seq_dim, head_dim, group, world_size, ulysses)
    d = grad.shape[-1]
    return full[..., :d].contiguous(), full[..., d:d + ratio].contiguous().view(work).squeeze(-1)


@attention_to_seq_backward.register_fake
def _(grad, out, work, seq_dim, head_dim, group, world_size, ulysses=0):
    heads = _s2h_fake(grad, seq_dim, head_dim, group, world_size, ulysses)
    return heads, heads.new_empty(heads.shape[:-1], dtype=work)


def _a2s_backward(ctx, grad):
    out, = ctx.saved_tensors
    dout, delta = attention_to_seq_backward(grad, out, ctx.delta_dtype, ctx.seq_dim, ctx.head_dim, ctx.group,
                                            ctx.world_size, ctx.ulysses)
    return (dout, delta) + (None,) * 6


attention_to_seq.register_autograd(_a2s_backward, setup_context=_a2s_setup)


# --- gather_kv: this block's keys/values -> every block's (P = U x R); backward: reduce-scatter ----

@torch.library.custom_op("autosp::gather_kv", mutates_args=())
def gather_kv(x: Tensor, seq_dim: int, group: str, world_size: int, ulysses: int) -> Tensor:
    """[.., U*S/P, ..] of this rank's heads -> [.., S_padded, ..]: the super-chunks of the R kv peers
    in sequence order (every rank's keys and values for its heads, the whole padded sequence)."""
    peers = kv_peers(_rank(group), world_size, ulysses)
    canon = x.movedim(seq_dim, 0)
    copies = canon.unsqueeze(0).expand(len(peers), *canon.shape)
    received = _all_to_all(copies, group, "all_gather", peers=peers)  # [peer, U*S/P, ...]
    whole = received.reshape(len(peers) * canon.shape[0], *canon.shape[1:])
    return whole.movedim(0, seq_dim).contiguous()


@gather_kv.register_fake
def _(x, seq_dim, group, world_size, ulysses):
    shape = list(x.shape)
    shape[seq_dim] = shape[seq_dim] * (world_size // ulysses)
    return x.new_empty(shape)


@torch.library.custom_op("autosp::scatter_kv_grad", mutates_args=())
def scatter_kv_grad(grad: Tensor, seq_dim: int, group: str, world_size: int, ulysses: int) -> Tensor:
    """Backward of gather_kv: each peer's super-chunk of the gradient sent to it, the received
    gradients of this rank's super-chunk summed."""
    peers = kv_peers(_rank(group), world_size, ulysses)
    canon = grad.movedim(seq_dim, 0)
    chunks = canon.reshape(len(peers), canon.shape[0] // len(peers), *canon.shape[1:])
    received = _all_to_all(chunks, group, "reduce_scatter", peers=peers)
    return received.sum(0).movedim(0, seq_dim).contiguous()


@scatter_kv_grad.register_fake
def _(grad, seq_dim, group, world_size, ulysses):
    shape = list(grad.shape)
    shape[seq_dim] = shape[seq_dim] // (world_size // ulysses)
    return grad.new_empty(shape)


def _gather_kv_setup(ctx, inputs, output):
    _, ctx.seq_dim, ctx.group, ctx.world_size, ctx.ulysses = inputs


def _gather_kv_backward(ctx, grad):
    return scatter_kv_grad(grad, ctx.seq_dim, ctx.group, ctx.world_size, ctx.ulysses), None, None, None, None


gather_kv.register_autograd(_gather_kv_backward, setup_context=_gather_kv_setup)


# --- head_chunk: this rank's heads of a value with one entry per head ------------------------------

@torch.library.custom_op("autosp::head_chunk", mutates_args=())
def head_chunk(x: Tensor, head_dim: int, group: str, world_size: int) -> Tensor:
    """This rank's heads of ``x`` along ``head_dim``, as ``seq_to_head`` gives them: ceil(H/P) per
    rank, zero heads past H (an attention written out reads such a value beside its scores:
    GPT-OSS's sinks, an ALiBi bias). No communication, forward or backward: every rank holds x."""
    per_rank = -(-x.shape[head_dim] // world_size)
    padded = pad_to(x, head_dim, per_rank * world_size)
    return padded.narrow(head_dim, _rank(group) * per_rank, per_rank).clone()


@head_chunk.register_fake
def _(x, head_dim, group, world_size):
    shape = list(x.shape)
    shape[head_dim] = -(-shape[head_dim] // world_size)
    return x.new_empty(shape)


@torch.library.custom_op("autosp::head_chunk_grad", mutates_args=())
def head_chunk_grad(grad: Tensor, head_dim: int, num_heads: int, group: str) -> Tensor:
    """Backward of head_chunk: this rank's heads' gradient in zeros for the others (the gradients
    summed over the group, as for every parameter, put the heads together)."""
    per_rank = grad.shape[head_dim]
    shape = list(grad.shape)
    shape[head_dim] = per_rank * dist.get_world_size(resolve_group(group))
    full = grad.new_zeros(shape)
    full.narrow(head_dim, _rank(group) * per_rank, per_rank).copy_(grad)
    return full.narrow(head_dim, 0, num_heads).clone()


@head_chunk_grad.register_fake
def _(grad, head_dim, num_heads, group):
    shape = list(grad.shape)
    shape[head_dim] = num_heads
    return grad.new_empty(shape)


def _head_chunk_setup(ctx, inputs, output):
    x, ctx.head_dim, ctx.group, _ = inputs
    ctx.num_heads = x.shape[ctx.head_dim]


def _head_chunk_backward(ctx, grad):
    return head_chunk_grad(grad, ctx.head_dim, ctx.num_heads, ctx.group), None, None, None


head_chunk.register_autograd(_head_chunk_backward, setup_context=_head_chunk_setup)


# --- group_sum: the loss reduction ----------------------------------------------------------------

@torch.library.custom_op("autosp::group_sum", mutates_args=())
def group_sum(x: Tensor, group: str) -> Tensor:
    """Sum of ``x`` over the group. Backward is the identity: each rank's gradient is that of its
    own contribution, so gradients summed over the group equal the single-device gradient."""
    pg = resolve_group(group)
    out = x.clone()
    check_device(out, pg, "group_sum")
    size = dist.get_world_size(pg)
    count("all_reduce", out, out.numel() * out.element_size() * 2 * (size - 1) / size)  # ring all-reduce
    dist.all_reduce(out, group=pg)
    return out


@group_sum.register_fake
def _(x, group):
    return torch.empty_like(x)


def _identity_backward(ctx, grad):
    return grad, None


group_sum.register_autograd(_identity_backward, setup_context=lambda ctx, inputs, output: None)


# --- gather: chunk -> the whole sequence; backward: a reduce-scatter ----------------------------------

@torch.library.custom_op("autosp::gather", mutates_args=())
def gather(x: Tensor, dim: int, length: int, group: str, world_size: int) -> Tensor:
    """Every rank's chunk of ``x`` along ``dim`` (``length`` positions in all, the end padded to a
    multiple of the world size) put together, padding dropped: the same on every rank."""
    pg = resolve_group(group)
    chunk = x.contiguous()
    check_device(chunk, pg, "gather")
    parts = [torch.empty_like(chunk) for _ in range(world_size)]
    count("all_gather", chunk, chunk.numel() * chunk.element_size() * (world_size - 1))
    dist.all_gather(parts, chunk, group=pg)
    return torch.cat(parts, dim).narrow(dim, 0, length).clone()


@gather.register_fake
def _(x, dim, length, group, world_size):
    shape = list(x.shape)
    shape[dim] = length
    return x.new_empty(shape)


@torch.library.custom_op("autosp::reduce_scatter", mutates_args=())
def reduce_scatter(grad: Tensor, dim: int, local_len: int, group: str, world_size: int) -> Tensor:
    """Backward of gather: the sum over the ranks of the gradient of this rank's chunk (one
    all-to-all: gloo has no reduce_scatter)."""
    padded = pad_to(grad, dim, local_len * world_size)
    moved = padded.movedim(dim, 0)
    chunks = moved.reshape(world_size, local_len, *moved.shape[1:])
    received = _all_to_all(chunks, group, "reduce_scatter")
    return received.sum(0).movedim(0, dim).contiguous()


@reduce_scatter.register_fake
def _(grad, dim, local_len, group, world_size):
    shape = list(grad.shape)
    shape[dim] = local_len
    return grad.new_empty(shape)


def _gather_setup(ctx, inputs, output):
    x, ctx.dim, _, ctx.group, ctx.world_size = inputs
    ctx.local_len = x.shape[ctx.dim]


def _gather_backward(ctx, grad):
    return reduce_scatter(grad, ctx.dim, ctx.local_len, ctx.group, ctx.world_size), None, None, None, None


gather.register_autograd(_gather_backward, setup_context=_gather_setup)


# --- count_once: a replicated value whose gradient counts on one rank only ------------------------

class _CountOnce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, rank):
        ctx.rank = rank
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return (grad if ctx.rank == 0 else torch.zeros_like(grad)), None


def count_once(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """``x`` unchanged (it is the same on every rank); its gradient is kept on rank 0 only, so
    summing the group's gradients counts it once."""
    return _CountOnce.apply(x, dist.get_rank(group))


# --- eager helpers used outside compiled graphs ----------------------------------------------------

def shard_chunk(x: Tensor, dim: int, layout, group: dist.ProcessGroup, pad_value: float = 0.0) -> Tensor:
    """``autosp::shard`` for a ``ChunkLayout``: this rank's chunk of the replicated ``x`` along
    ``dim`` (``pad_value`` past the length); its backward needs no communication."""
    return shard(x, dim % x.dim(), 1, layout.length, layout.local_len, pad_value, group_key(group),
                 layout.world_size)


def gather_chunks(x: Tensor, dim: int, layout, group: dist.ProcessGroup) -> Tensor:
    """``autosp::gather`` for a ``ChunkLayout``: the whole sequence from every rank's chunk."""
    return gather(x, dim % x.dim(), layout.length, group_key(group), layout.world_size)


def pad_to(x: Tensor, dim: int, size: int, value: float = 0.0) -> Tensor:
    """``x`` padded with ``value`` at the end of ``dim`` to ``size``."""
    if x.shape[dim] == size:
        return x
    pad_shape = list(x.shape)
    pad_shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_full(pad_shape, value)], dim)


def strip_padding(x: Tensor, dim: int, inner: int, length: int, local_len: int, group: str) -> Tensor:
    """This rank's chunk without the padding positions (the last ranks may hold fewer or none)."""
    valid = max(0, min(local_len, length - _rank(group) * local_len))
    split = _split_seq(x, dim, inner, local_len).narrow(dim + 1, 0, valid)
    shape = list(x.shape)
    shape[dim] = shape[dim] // local_len * valid
    return split.reshape(shape)


def gather_sequence(x: Tensor, dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate every rank's (unpadded) chunk along ``dim``: the full-sequence value (no grad).
    Every tensor it sends is on ``x``'s device (NCCL takes CUDA tensors only)."""
    group = group or dist.group.WORLD
    size = torch.tensor(x.shape[dim], device=x.device)
    check_device(size, group, "gather_sequence")
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    lengths = [int(s) for s in sizes]
    padded = pad_to(x.detach().movedim(dim, -1), -1, max(lengths))
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[..., :n] for p, n in zip(parts, lengths)], -1).movedim(-1, dim)
