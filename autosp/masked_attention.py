"""Attention with a mask given as O(S) data: never an [S, S] tensor, in the forward or the backward.

``autosp::masked_attention(q, k, v, leaves, program, length, ...)`` computes
``scaled_dot_product_attention(q, k, v, attn_mask=M)`` where ``M`` is the mask the model built,
described by a *program*: the pointwise ops (comparisons, logic, arithmetic, ``where``, casts)
the model applied to *leaves*, tensors that each carry the sequence on at most one dim (positions,
document ids, key-padding vectors: ``autosp.passes.masks`` finds them). The op runs over blocks of
queries: for each block it slices the leaves along their query dim, replays the program to get
the block's rows of ``M`` ([.., Bq, S] at most), and attends those queries to the keys the rows
reach. The backward recomputes each block's rows the same way from the saved log-sum-exp, so the
memory beside q, k, v and the output is one block's scores, whatever S is.

Padding (P does not divide S): keys at or past ``length`` are never attended and queries past it
give zeros (they are padding; zeros keep them finite). A row no key may see gives zeros with a
zero gradient, as torch's SDPA does. Half-precision inputs are computed in float32.

A program is JSON: ``{"q_dims": [...], "ops": [[op, args, kwargs], ...]}``: for each leaf the
dim that runs along the queries (-1: none), sliced to the block's rows, then the ops evaluated in
order; ``{"ref": i}`` in an argument is value i (the leaves first, then the results of the ops),
and the last value is the mask (the only leaf, when there are no ops; none: no mask). ``OPS`` and ``BLOCK_OPS`` (the block's query and key positions, for masks a model makes
with ``eye``/``tril``/``triu``, and constants, for ``ones``/``full``) list every op a program may
use; nothing else is ever evaluated.
"""
from __future__ import annotations

import functools
import json
import math
import operator
import threading
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from autosp.errors import AutoSPError

# Pointwise ops a mask program may use (broadcasting). ``expand``/``contiguous``/``clone`` are
# identities here: the block's rows broadcast against the scores anyway.
OPS = {
    "and": operator.and_, "or": operator.or_, "xor": operator.xor, "invert": operator.invert,
    "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
    "ge": operator.ge, "add": operator.add, "sub": operator.sub, "mul": operator.mul,
    "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod,
    "neg": operator.neg, "abs": operator.abs, "where": torch.where,
    "logical_and": torch.logical_and, "logical_or": torch.logical_or,
    "logical_not": torch.logical_not, "logical_xor": torch.logical_xor,
    "maximum": torch.maximum, "minimum": torch.minimum,
    "to_dtype": lambda x, dtype: x.to(dtype), "identity": lambda x: x,
    "unsqueeze": torch.unsqueeze, "index": operator.getitem,
    "tril": lambda x, rows, cols, d: torch.where(cols - rows <= d, x, torch.zeros((), dtype=x.dtype, device=x.device)),
    "triu": lambda x, rows, cols, d: torch.where(cols - rows >= d, x, torch.zeros((), dtype=x.dtype, device=x.device)),
}
# Ops that read the block: the query positions of its rows ([Bq, 1]), the key positions
# ([1, S]), a constant (a 0-d tensor on the block's device).
BLOCK_OPS = {
    "rows": lambda block: torch.arange(block.start, block.stop, device=block.device).unsqueeze(-1),
    "cols": lambda block: torch.arange(block.length, device=block.device).unsqueeze(0),
    "full": lambda block, value, dtype: torch.full((), value, dtype=dtype, device=block.device),
}
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64)}
# Scores per block (batch x heads x query rows x keys), the op's working memory, in elements:
# 0 (the default) means as many as q has (then the working memory grows like the activations,
# linearly in S), and at least MIN_BLOCK_ELEMENTS.
DEFAULT_BLOCK_ELEMENTS = 0
MIN_BLOCK_ELEMENTS = 1 << 16


def _decode(arg, values):
    if isinstance(arg, list):
        return [_decode(a, values) for a in arg]
    if isinstance(arg, dict):
        if "ref" in arg:
            return values[arg["ref"]]
        if "dtype" in arg:
            return DTYPES[arg["dtype"]]
        if "slice" in arg:
            return slice(*arg["slice"])
        if "ellipsis" in arg:
            return Ellipsis
        if "tuple" in arg:
            return tuple(_decode(a, values) for a in arg["tuple"])
        if "float" in arg:
            return float(arg["float"])  # inf and nan, which JSON has no literal for
    return arg


@functools.lru_cache(maxsize=256)
def parse(program: str) -> tuple[list, list]:
    """(q_dims, ops) of a program."""
    spec = json.loads(program)
    for op, _, _ in spec["ops"]:
        if op not in OPS and op not in BLOCK_OPS:
            raise ValueError(f"autosp: mask program uses {op!r}, not an allowed op")
    return spec["q_dims"], spec["ops"]


def program_of(q_dims: list[int], ops: list) -> str:
    return json.dumps({"q_dims": list(q_dims), "ops": ops})


class ProgramBuilder:
    """Writes a program over ``len(q_dims)`` leaves (values 0..n-1, each with its query dim):
    ``emit`` adds an op and returns a reference to its value."""

    def __init__(self, q_dims: list[int]):
        self.q_dims, self.ops, self._positions = list(q_dims), [], {}

    @staticmethod
    def leaf(i: int) -> dict:
        return {"ref": i}

    def emit(self, op: str, args: list, kwargs: dict | None = None) -> dict:
        self.ops.append([op, args, kwargs or {}])
        return {"ref": len(self.q_dims) + len(self.ops) - 1}

    def positions(self, which: str) -> dict:
        """The block's query ("rows", [Bq, 1]) or key ("cols", [1, S]) positions, made once."""
        if which not in self._positions:
            self._positions[which] = self.emit(which, [])
        return self._positions[which]

    def program(self, result: dict | None = None) -> str:
        """The program whose mask is ``result`` (default: the last value)."""
        last = len(self.q_dims) + len(self.ops) - 1
        if result is not None and result["ref"] != last:
            self.emit("identity", [result])
        return program_of(self.q_dims, self.ops)


def _causal_program() -> str:
    program = ProgramBuilder([])
    program.emit("ge", [program.positions("rows"), program.positions("cols")])
    return program.program()


# ``is_causal`` as a program: query position >= key position (queries that do not start at
# position 0, where torch's ``is_causal`` would align the wrong corner).
CAUSAL_PROGRAM = _causal_program()


@dataclass(frozen=True)
class Block:
    """Query rows ``start:stop`` of a mask over ``length`` keys."""
    start: int
    stop: int
    length: int
    device: torch.device


def evaluate(program: str, leaves, block: Block) -> Tensor | None:
    """The block's rows of the mask a program computes from ``leaves`` (None: no mask)."""
    q_dims, ops = parse(program)
    values = [leaf if d < 0 else leaf.narrow(d, block.start, block.stop - block.start)
              for leaf, d in zip(leaves, q_dims)]
    if not ops:
        return values[0] if values else None
    for op, args, kwargs in ops:
        args, kwargs = _decode(args, values), _decode(kwargs, values)
        values.append(BLOCK_OPS[op](block, *args, **kwargs) if op in BLOCK_OPS else OPS[op](*args, **kwargs))
    return values[-1]


def _work_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Blocks:
    """The query blocks of one call and, for each, its mask rows and the keys they reach."""

    def __init__(self, q, k, leaves, program, length, block_elements, offset=0):
        self.leaves, self.program, self.length, self.offset = leaves, program, length, offset
        self.device = q.device
        self.scores_shape = q.shape[:-1] + (k.shape[2],)
        batch, heads, rows = q.shape[0], q.shape[1], q.shape[2]
        per_row = max(1, batch * heads * min(length, k.shape[2]))
        budget = block_elements or max(MIN_BLOCK_ELEMENTS, q.numel())
        self.size = max(1, min(rows, budget // per_row))
        self.rows = rows

    def _check(self, mask, rows):
        want = (*self.scores_shape[:-2], rows, self.length)
        try:
            fits = torch.broadcast_shapes(mask.shape, want) == want
        except RuntimeError:
            fits = False
        if not fits:
            raise RuntimeError(f"autosp::masked_attention: the mask's rows for queries {rows} long over "
                               f"{self.length} keys have shape {tuple(mask.shape)}, which does not "
                               f"broadcast to the scores {want}")

    def __iter__(self):
        """(first row, last row + 1, the rows' mask, first key, last key + 1) per block; rows count
        from this call's first query, which is position ``offset`` of the sequence."""
        real_rows = min(self.rows, self.length - self.offset)
        for start in range(0, real_rows, self.size):
            stop = min(start + self.size, real_rows)
            block = Block(self.offset + start, self.offset + stop, self.length, self.device)
            mask = evaluate(self.program, self.leaves, block)
            if mask is not None:
                self._check(mask, stop - start)
            key_stop = self.length
            key_start = 0
            if mask is not None and mask.dtype == torch.bool and mask.dim() >= 1 and mask.shape[-1] > 1:
                reached = mask.reshape(-1, mask.shape[-1]).any(0).nonzero()
                if reached.numel() == 0:
                    yield start, stop, mask, 0, 0
                    continue
                key_start, key_stop = int(reached[0]), int(reached[-1]) + 1
                mask = mask[..., key_start:key_stop]
            yield start, stop, mask, key_start, key_stop


def _scores(qb, k, mask, scale, groups):
    """[B, H, Bq, Sk] scores of a block (kv heads shared by ``groups`` query heads each)."""
    b, h, rows, d = qb.shape
    q5 = qb.reshape(b, h // groups, groups, rows, d)
    s = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)).reshape(b, h, rows, k.shape[2]) * scale
    if mask is None:
        return s
    if mask.dtype == torch.bool:
        return s.masked_fill(~mask, float("-inf"))
    return s + mask.to(s.dtype)


def _grouped(x, groups):
    """[B, H, Bq, Sk] -> [B, Hkv, groups, Bq, Sk] (query heads that share a kv head together)."""
    b, h = x.shape[:2]
    return x.reshape(b, h // groups, groups, *x.shape[2:])


def _groups(q, k, enable_gqa: bool) -> int:
    if q.shape[1] == k.shape[1]:
        return 1
    if not enable_gqa or q.shape[1] % k.shape[1]:
        raise RuntimeError(f"autosp::masked_attention: {q.shape[1]} query heads and {k.shape[1]} "
                           f"key/value heads without enable_gqa")
    return q.shape[1] // k.shape[1]


def _offset(q: Tensor, group: str, ulysses: int) -> int:
    """The sequence position of q's first row: 0, or with keys and values gathered over blocks of
    ``ulysses`` ranks (``autosp::gather_kv``), where this rank's block starts."""
    if not group:
        return 0
    from autosp.collectives.ops import _rank
    return _rank(group) // ulysses * q.shape[2]


# Forward calls by kernel: "fused" (torch's, run by run: autosp/mask_runs.py) or "blocks". Process-wide.
KERNELS: Counter = Counter()
_KERNELS_LOCK = threading.Lock()


def _ran(kernel: str) -> None:
    with _KERNELS_LOCK:
        KERNELS[kernel] += 1


def _runs(q, k, v, group, ulysses, key_ranges, length):
    from autosp import mask_runs  # it reads this module's programs
    return mask_runs.fused(q, k, v, key_ranges, length, _offset(q, group, ulysses))


@torch.library.custom_op("autosp::masked_attention", mutates_args=())
def masked_attention(q: Tensor, k: Tensor, v: Tensor, leaves: list[Tensor], program: str, length: int, scale: float, enable_gqa: bool,
                     block_elements: int, group: str, ulysses: int, key_ranges: Tensor | None,
                     lse_grad_is_delta: bool = False) -> tuple[Tensor, Tensor]:
    """(attention output [B, H, S', Dv], log-sum-exp [B, H, S']) for [B, H, S', D] q; the log-sum-exp
    in float32 for half-precision inputs. q's rows are positions 0.. of the sequence (``group`` ""),
    or, given the group and the Ulysses degree of a two-level layout, those of this rank's block.
    ``key_ranges``: ``autosp::mask_key_ranges`` of the same mask, or None; where its rows are runs,
    torch's fused kernel runs once per run instead of the blocks (``autosp/mask_runs.py``).
    ``lse_grad_is_delta``: the output is not saved; the backward takes rowsum(dO * O) as the
    log-sum-exp's gradient (the output goes to ``autosp::attention_to_seq``, which sends it)."""
    runs = _runs(q, k, v, group, ulysses, key_ranges, length)
    if runs is not None:
        _ran("fused")
        from autosp import mask_runs
        return mask_runs.forward(q, k, v, runs, scale, _work_dtype(q.dtype))
    _ran("blocks")
    groups = _groups(q, k, enable_gqa)
    work = _work_dtype(q.dtype)
    qw, kw, vw = q.to(work), k.to(work), v.to(work)
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=work)
    lse = q.new_full(q.shape[:-1], float("-inf"), dtype=work)
    for start, stop, mask, k0, k1 in _Blocks(q, k, leaves, program, length, block_elements,
                                             _offset(q, group, ulysses)):
        if k1 == k0:
            continue
        s = _scores(qw[:, :, start:stop], kw[:, :, k0:k1], mask, scale, groups)
        block_lse = torch.logsumexp(s, -1)
        p = torch.exp(s - block_lse.unsqueeze(-1)).nan_to_num_(0.0)  # rows that see no key: 0
        o = torch.matmul(_grouped(p, groups), vw[:, :, k0:k1].unsqueeze(2))
        out[:, :, start:stop] = o.reshape(out[:, :, start:stop].shape)
        lse[:, :, start:stop] = block_lse
    return out.to(q.dtype), lse


@masked_attention.register_fake
def _(q, k, v, leaves, program, length, scale, enable_gqa, block_elements, group, ulysses, key_ranges,
      lse_grad_is_delta=False):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    return out, q.new_empty(q.shape[:-1], dtype=_work_dtype(q.dtype))


@torch.library.custom_op("autosp::masked_attention_backward", mutates_args=())
def masked_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, delta: Tensor, lse: Tensor,
                              leaves: list[Tensor], program: str, length: int,
                              scale: float, enable_gqa: bool, block_elements: int, group: str,
                              ulysses: int, key_ranges: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    runs = _runs(q, k, v, group, ulysses, key_ranges, length)
    if runs is not None:
        from autosp import mask_runs
        return mask_runs.backward(grad, q, k, v, delta, lse, runs, scale)
    groups = _groups(q, k, enable_gqa)
    work = _work_dtype(q.dtype)
    qw, kw, vw, gw = (t.to(work) for t in (q, k, v, grad))  # delta [B, H, S']: rowsum(dO * O), in work
    dq, dk, dv = torch.zeros_like(qw), torch.zeros_like(kw), torch.zeros_like(vw)
    for start, stop, mask, k0, k1 in _Blocks(q, k, leaves, program, length, block_elements,
                                             _offset(q, group, ulysses)):
        if k1 == k0:
            continue
        qb, kb, vb, gb = qw[:, :, start:stop], kw[:, :, k0:k1], vw[:, :, k0:k1], gw[:, :, start:stop]
        s = _scores(qb, kb, mask, scale, groups)
        p = torch.exp(s - lse[:, :, start:stop].unsqueeze(-1)).nan_to_num_(0.0)
        pg, gg = _grouped(p, groups), _grouped(gb, groups)  # [B, Hkv, g, Bq, Sk], [B, Hkv, g, Bq, Dv]
        dv[:, :, k0:k1] += torch.matmul(pg.transpose(-1, -2), gg).sum(2)
        dp = torch.matmul(gg, vb.unsqueeze(2).transpose(-1, -2))  # [B, Hkv, g, Bq, Sk]
        ds = pg * (dp - _grouped(delta[:, :, start:stop], groups).unsqueeze(-1))
        dq[:, :, start:stop] = (torch.matmul(ds, kb.unsqueeze(2)) * scale).reshape(qb.shape)
        dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), _grouped(qb, groups)).sum(2) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@masked_attention_backward.register_fake
def _(grad, q, k, v, delta, lse, leaves, program, length, scale, enable_gqa, block_elements, group, ulysses,
      key_ranges):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, leaves, *args, key_ranges, ctx.delta_from_grad = inputs  # inputs hold every argument, defaults too
    out = () if ctx.delta_from_grad else (output[0],)
    ctx.save_for_backward(q, k, v, output[1], key_ranges, *leaves, *out)
    ctx.leaves = len(leaves)
    ctx.args = tuple(args)  # program, length, scale, enable_gqa, block_elements, group, ulysses


def _backward(ctx, grad, grad_lse):
    q, k, v, lse, key_ranges, *rest = ctx.saved_tensors
    leaves = rest[:ctx.leaves]
    if ctx.delta_from_grad:
        if grad_lse is None:
            raise AutoSPError("autosp::masked_attention(lse_grad_is_delta=True): no rowsum(dO * O) arrived as "
                              "its log-sum-exp's gradient; its output must go to autosp::attention_to_seq")
        delta = grad_lse
    else:
        work = lse.dtype
        delta = (grad.to(work) * rest[-1].to(work)).sum(-1)
    dq, dk, dv = masked_attention_backward(grad, q, k, v, delta, lse, leaves, *ctx.args, key_ranges)
    # torch drops a trailing argument equal to its default from the call: no gradient slot for it
    return (dq, dk, dv, [None] * len(leaves)) + (None,) * (len(ctx.args) + 1 + ctx.delta_from_grad)


masked_attention.register_autograd(_backward, setup_context=_setup)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
