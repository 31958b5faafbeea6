"""Working memory of ``autosp::masked_attention`` and its backward, counted from their code
(autosp/masked_attention.py), in bytes beyond the op's outputs.

Both ops first cast q, k, v (and, backward, the output and its gradient) to float32 when they
are half precision, allocate their float32 results (forward: output and log-sum-exp; backward:
dq, dk, dv), then loop over blocks of query rows. A block's scores hold E = batch x heads x rows
x keys float32 elements (rows chosen so E stays under the block budget: by default as many
elements as q has). Python keeps a loop's locals until they are rebound, so the previous block's
tensors are still alive while the next block computes: at its peak the forward holds 4 E (the
previous block's scores and probabilities, the new scores and their scaled copy), the backward
6 E (its four held blocks: scores, probabilities, their gradient and the softmax's; plus two
being made), plus the block's mask rows (the mask program's values) and the negated mask.
The keys a block reaches are taken as all of them (the last block of a causal mask does reach
them all; a sliding window reaches fewer, so this is an upper bound there).
"""
from __future__ import annotations

import math

import torch

from autosp import masked_attention as ma

_F32 = 4


def _args(node, ev) -> dict:
    """The node's arguments by the op schema's names, evaluated at the current length."""
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        raw = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name, arg.default_value)
        out[arg.name] = ev.value(raw, device="meta")
    return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _work_size(dtype) -> int:
    return _F32 if dtype in (torch.float16, torch.bfloat16) else torch.empty((), dtype=dtype).element_size()


def block_geometry(q, k, length: int, block_elements: int) -> tuple[int, int, int]:
    """(rows per block, keys per block, number of blocks) as ``_Blocks`` chooses them."""
    batch, heads, rows = q.shape[0], q.shape[1], q.shape[2]
    keys = min(length, k.shape[2])
    per_row = max(1, batch * heads * keys)
    budget = block_elements or max(ma.MIN_BLOCK_ELEMENTS, q.numel())
    size = max(1, min(rows, budget // per_row))
    return size, keys, math.ceil(min(rows, length) / size)


def _key(values) -> tuple:
    return tuple((tuple(v.shape), tuple(v.stride()), str(v.dtype)) for v in values)


def _mask_bytes(args, rows: int, cache: dict) -> tuple[int, int, int]:
    """(peak bytes while a block's mask rows are computed, bytes they keep, bytes of the negated
    or cast rows) for one block: the mask program run on meta leaves sliced to ``rows``."""
    from autosp_verify.scale.workspace import StorageTracker
    leaves, program, length = args["leaves"], args["program"], int(args["length"])
    rows = min(rows, length)  # a block stops at the length (the padding's rows are never built)
    key = ("mask", program, rows, length, _key(leaves))
    if key not in cache:
        tracker = StorageTracker().ignore(leaves)
        with tracker:
            if hasattr(ma, "Block"):  # the program carries its query dims
                mask = ma.evaluate(program, leaves, ma.Block(0, rows, length, torch.device("meta")))
            else:
                sliced = [x if d < 0 else x.narrow(d, 0, rows) for x, d in zip(leaves, args["q_dims"])]
                mask = ma.evaluate(program, sliced)
        if mask is None:
            cache[key] = (0, 0, 0)
        else:
            cast = 1 if mask.dtype == torch.bool else _F32
            cache[key] = (tracker.peak, tracker.live, mask.numel() * cast)
        del mask
    return cache[key]


class _Sizes:
    """Bytes of one block's tensors, per block of ``rows`` query rows (``scores``: its E), and of
    the matmul temporaries that scale with the keys."""

    def __init__(self, args, cache):
        q, k, v = args["q"], args["k"], args["v"]
        self.rows, self.keys, self.blocks = block_geometry(q, k, int(args["length"]), int(args["block_elements"]))
        self.w = w = _work_size(q.dtype)
        b, h, kv_heads, d, dv = q.shape[0], q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
        self.b, self.h, self.d, self.dv = b, h, d, dv
        grouped = h != kv_heads  # GQA inside the op: k and v blocks are expanded (copied) per group
        self.k_expanded = b * h * self.keys * d * w if grouped else 0
        self.v_expanded = b * h * self.keys * dv * w if grouped else 0
        self.dk_block, self.dk_sum = b * h * self.keys * d * w, b * kv_heads * self.keys * d * w
        self.dv_block, self.dv_sum = b * h * self.keys * dv * w, b * kv_heads * self.keys * dv * w
        # the block's mask rows: their evaluation's peak, what stays, and ~mask (or a cast float mask)
        self.evaluate_peak, self.mask, self.negated = _mask_bytes(args, self.rows, cache)
        total = min(q.shape[2], int(args["length"]))
        last = total - (self.blocks - 1) * self.rows
        # (previous block's rows, this block's rows): the pairs a loop iteration holds at once
        self.pairs = [(0, min(self.rows, total))]
        self.pairs += [(self.rows, self.rows)] if self.blocks >= 3 else []
        self.pairs += [(self.rows, last)] if self.blocks >= 2 else []

    def scores(self, rows: int) -> int:
        return self.b * self.h * rows * self.keys * self.w

    def per_row(self, rows: int, width: int) -> int:
        return self.b * self.h * rows * width * self.w


def ranges_workspace(node, ev) -> int:
    """``autosp::mask_key_ranges``: one block of its check (``block_ranges``), run on meta leaves
    (its output, [batches, S, 2], is the graph's to count)."""
    from autosp import mask_runs
    from autosp_verify.scale.workspace import StorageTracker
    args = _args(node, ev)
    leaves, program, length = args["leaves"], args["program"], int(args["length"])
    key = ("key_ranges", program, length, _key(leaves))
    if key not in ev.cache:
        tracker = StorageTracker().ignore(leaves)
        with tracker:
            found = mask_runs.block_ranges(program, leaves, ma.Block(0, mask_runs.check_rows(length), length,
                                                                     torch.device("meta")))
        ev.cache[key] = tracker.peak
        del found
    return ev.cache[key]


def forward_workspace(node, ev) -> int:
    return forward_bytes(_args(node, ev), ev.cache)


def backward_workspace(node, ev) -> int:
    return backward_bytes(_args(node, ev), ev.cache)


def _forward_loop(z: _Sizes) -> int:
    peak = 0
    for prev_rows, rows in z.pairs:
        p, e, m = z.scores(prev_rows), z.scores(rows), z.mask
        o_prev, o = z.per_row(prev_rows, z.dv), z.per_row(rows, z.dv)
        held = 2 * p + o_prev  # the previous block's s, p and o
        peak = max(peak, held + (m if p else 0) + z.evaluate_peak,      # its mask rows
                   held + m + max(z.k_expanded + e, 2 * e + z.negated),  # scores: q k^T, scaled, masked
                   held - p + m + 3 * e,                                 # p = exp(s - lse): two new blocks
                   2 * e + m + z.v_expanded + o + o_prev)                # o = p v
    return peak


def _backward_loop(z: _Sizes) -> int:
    peak = 0
    for prev_rows, rows in z.pairs:
        p, e, m = z.scores(prev_rows), z.scores(rows), z.mask
        peak = max(peak, 4 * p + (m if p else 0) + z.evaluate_peak,      # held: s, p, dp, ds
                   4 * p + m + max(z.k_expanded + e, 2 * e + z.negated),  # s
                   3 * p + m + 3 * e,                                     # p = exp(s - lse)
                   2 * p + m + 2 * e + z.dv_block + z.dv_sum,             # dv += (p^T g).sum
                   2 * p + m + 3 * e + z.v_expanded,                      # dp = g v^T
                   p + m + 5 * e,                                         # ds = p (dp - delta)
                   m + 4 * e + z.k_expanded + 2 * z.per_row(rows, z.d),   # dq
                   m + 4 * e + max(z.dk_block + z.dk_sum, 2 * z.dk_sum))  # dk += (ds^T q).sum * scale
    return peak


def forward_bytes(args: dict, cache: dict) -> int:
    """The forward's working memory for its arguments by name (tensors: meta is enough)."""
    q, k, v = args["q"], args["k"], args["v"]
    half = q.dtype in (torch.float16, torch.bfloat16)
    w = _work_size(q.dtype)
    casts = (q.numel() + k.numel() + v.numel()) * w if half else 0
    out32 = q.numel() // q.shape[-1] * v.shape[-1] * w
    out16 = out32 // w * q.element_size() if half else 0
    loop = _forward_loop(_Sizes(args, cache))
    if half:  # outputs: the cast output and the log-sum-exp; out32 stays until the return
        return casts + out32 + max(loop, out16) - out16
    return loop


def backward_bytes(args: dict, cache: dict) -> int:
    """The backward's working memory for its arguments by name (tensors: meta is enough)."""
    q, k, v, grad = args["q"], args["k"], args["v"], args["grad"]
    half = q.dtype in (torch.float16, torch.bfloat16)
    w = _work_size(q.dtype)
    qkv = q.numel() + k.numel() + v.numel()
    casts = (qkv + grad.numel()) * w if half else 0  # q, k, v and grad in float32 (delta is an input)
    grads32 = qkv * w
    loop = _backward_loop(_Sizes(args, cache))
    outputs = qkv * q.element_size()
    if half:
        return casts + grads32 + max(loop, outputs) - outputs
    return loop
