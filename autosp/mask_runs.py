"""Masks that torch's fused attention kernel can apply: found at run time, once a step.

HF builds an attention mask whenever it cannot prove under ``torch.compile`` that it needs none
(``use_cache=False``, which its activation checkpointing sets; packed documents; padding), and
``autosp::masked_attention`` would apply it one block of rows at a time. Most such masks are
*runs*: consecutive query rows that see one contiguous range of keys, either causally (the run's
first row is its first key: a document, or the whole sequence) or all of it (right padding's
rows, a bidirectional mask over the real keys); rows that see no key (left padding) give zeros.
``autosp::mask_key_ranges`` finds the range of keys each row sees, a block of rows at a time
(O(S^2) comparisons, once a step; O(S) memory): an int64 [batches, S, 2] tensor of (first key,
last key), first > last for a row that sees none, every entry -1 when some row does not see one
contiguous range. ``masked_attention`` cuts the rows into runs (``runs``) and calls torch's fused
kernel once per run (``pieces``: twice for a causal run begun before a rank's block of queries)
instead of its blocks. A sliding window (row r sees the W keys up to r) is a run too, taken W - 1
rows at a time (``_window_pieces``). A mask that is not of that form (a finite bias, positions
out of order, a window of a few keys: too many calls) keeps the blocks.

A kernel call (``pieces``) is (batch, first row, end row, first key, end key, kind, merge): kind
ALL (every row sees every key), CAUSAL (torch's ``is_causal``: the j-th row sees the first j + 1
keys, the top-left corner) or FLIPPED (the same on rows and keys in reverse order: the j-th of
R rows sees the keys from the j-th on, the bottom-right corner); ``merge``: the call adds its
keys to an earlier call over the same rows (softmax over both, by their log-sum-exps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from autosp.flash_attention import FLASH, FLASH_BACKWARD, standin_output
from autosp.flash_attention import runs as flash_runs
from autosp.masked_attention import CAUSAL_PROGRAM, Block, evaluate, parse

CHECK_ELEMENTS = 1 << 20  # mask entries per block of rows the check evaluates
ALL, CAUSAL, FLIPPED = 0, 1, 2  # a kernel call's kind (the module doc)
FIXED, CAUSAL_RUN, WINDOW = 0, 1, 2  # a run's kind: one range, causal from its first key, a sliding window


def _hidden(mask: Tensor) -> Tensor:
    """Entries of an additive mask that hide their key: -inf, or the mask dtype's lowest."""
    return (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)


def check_rows(length: int) -> int:
    """Rows per block of the check."""
    return max(1, min(length, CHECK_ELEMENTS // max(1, length)))


def row_ranges(program: str, leaves, block: Block) -> tuple[Tensor, Tensor] | None:
    """(first key, last key) each of the block's rows sees, [batches, rows] (an empty row: first
    > last), or None when some row does not see one contiguous range or an additive mask has an
    entry that is neither 0 nor hidden."""
    mask = evaluate(program, leaves, block)
    causal = _causal_rows(mask, block)
    if causal is not None:
        return causal
    found = block_ranges(program, leaves, block, mask)
    if found is None or not bool(found[2]):
        return None
    return found[0], found[1]


def _causal_rows(mask: Tensor | None, block: Block) -> tuple[Tensor, Tensor] | None:
    """The block's ranges when its rows are exactly causal (row i sees keys 0..i: the common
    case, in a third of the work of ``block_ranges``), else None."""
    if mask is None or mask.dtype != torch.bool or mask.dim() < 2 or mask.shape[-1] != block.length \
            or mask.shape[-2] not in (1, block.stop - block.start):
        return None
    rows = torch.arange(block.start, block.stop, device=mask.device)
    if not bool((mask == (torch.arange(block.length, device=mask.device) <= rows[:, None])).all()):
        return None
    return torch.zeros(1, len(rows), dtype=torch.int64), rows.cpu()[None]


def block_ranges(program: str, leaves, block: Block, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """``row_ranges`` before it reads a value: (first, last, whether every row is one range) as
    tensors, so that it also runs on meta tensors (the scale simulator counts its memory).
    ``mask``: the block's rows of the mask, when already evaluated."""
    mask = evaluate(program, leaves, block) if mask is None else mask
    rows, length = block.stop - block.start, block.length
    if mask is None or mask.dim() < 2 or mask.shape[-1] not in (1, length) or mask.shape[-2] not in (1, rows):
        return None
    if mask.dim() > 2 and any(d != 1 for d in mask.shape[1:-2]):
        return None  # per-head masks
    visible = mask if mask.dtype == torch.bool else mask == 0
    ok = (visible | _hidden(mask)).all() if mask.dtype != torch.bool else None
    visible = visible.broadcast_to(*mask.shape[:-2], rows, length).reshape(-1, rows, length)
    as_bytes = visible.view(torch.uint8)  # argmax finds the first True; no int64 copy of the block
    first = as_bytes.argmax(-1, keepdim=True)
    last = length - 1 - as_bytes.flip(-1).argmax(-1, keepdim=True)
    keys = torch.arange(length, device=mask.device)
    empty = ~visible.any(-1, keepdim=True)
    # one contiguous range: the row is exactly first..last (bool work only, a few blocks' worth)
    ranges = ((visible == ((keys >= first) & (keys <= last))).all(-1, keepdim=True) | empty).all()
    first, last, empty = first.squeeze(-1), last.squeeze(-1), empty.squeeze(-1)
    return first.masked_fill(empty, length), last.masked_fill(empty, -1), ranges if ok is None else ranges & ok


def _runs_of(first: Tensor, last: Tensor, max_runs: int) -> list[tuple] | None:
    """Runs (first row, end row, first key, end key, kind) of one batch element's rows, from each
    row's key range (first > last: none); None if there are too many. Kinds: FIXED (every row sees
    first key..end key), CAUSAL_RUN (row r sees keys first..r), WINDOW (row r sees the keys from
    r - (first row - first key) to r)."""
    n = first.numel()
    rows, empty = torch.arange(n), first > last
    seen = ~empty[1:] & ~empty[:-1]
    same_first = seen & (first[1:] == first[:-1])
    diagonal = (last[1:] == rows[1:]) & (last[:-1] == rows[:-1])
    # how each row continues the one before it: 1 the same range, 2 one key more along the
    # diagonal (causal), 3 both see nothing, 4 the range moved one key along the diagonal (a
    # window), 0 not at all
    step = torch.zeros(n, dtype=torch.int64)
    step[1:][same_first & (last[1:] == last[:-1])] = 1
    step[1:][same_first & diagonal] = 2
    step[1:][empty[1:] & empty[:-1]] = 3
    step[1:][seen & (first[1:] == first[:-1] + 1) & diagonal] = 4
    start = step == 0
    start[1:] |= (step[:-1] != 0) & (step[1:] != step[:-1])  # a change of kind starts a run
    starts = start.nonzero().flatten().tolist()
    if len(starts) > max_runs:
        return None
    out = []
    for r0, r1 in zip(starts, starts[1:] + [n]):
        a, b = int(first[r0]), int(last[r0])
        if a > b:
            continue  # rows that see nothing: zeros
        kind = {2: CAUSAL_RUN, 4: WINDOW}.get(int(step[r0 + 1]), FIXED) if r1 - r0 > 1 else FIXED
        out.append((r0, r1, a, b + 1 if kind == FIXED else r1, kind))
    return out


def _most_runs(length: int) -> int:
    """Runs a mask of ``length`` rows may have (kernel calls: twice that) before the blocks cost
    less: one kernel call per 16 rows or fewer would cost more than them."""
    return 8 + length // 16


def runs(ranges: Tensor, length: int) -> list[tuple] | None:
    """(batch or -1 for all, first row, end row, first key, end key, kind) of every run, from
    ``mask_key_ranges``; None where the rows are not runs, or too many (``_most_runs``)."""
    if ranges.numel() == 0 or int(ranges[0, 0, 0]) < 0:
        return None
    out = []
    for b in range(ranges.shape[0]):
        found = _runs_of(ranges[b, :length, 0], ranges[b, :length, 1], max_runs=_most_runs(length))
        if found is None:
            return None
        out += [(b if ranges.shape[0] > 1 else -1, *run) for run in found]
    return out


def key_ranges(leaves, program: str, length: int, batches: int) -> Tensor:
    """(first key, last key) of each of the first ``length`` rows of the mask a program computes,
    [batches, length, 2] (see the module docstring)."""
    out = torch.full((batches, length, 2), -1, dtype=torch.int64)
    if not parse(program)[1] and not leaves:
        return out  # no mask at all: every key visible, padded ones too
    if not leaves and program == CAUSAL_PROGRAM:  # O(S): row i sees 0..i
        out[..., 0], out[..., 1] = 0, torch.arange(length)
        return out
    device = leaves[0].device if leaves else torch.device("cpu")
    step = check_rows(length)
    for start in range(0, length, step):
        ranges = row_ranges(program, leaves, Block(start, min(start + step, length), length, device))
        if ranges is None or ranges[0].shape[0] not in (1, batches):
            return out.fill_(-1)
        out[:, start:start + ranges[0].shape[1], 0] = ranges[0].cpu()
        out[:, start:start + ranges[0].shape[1], 1] = ranges[1].cpu()
    return out


@torch.library.custom_op("autosp::mask_key_ranges", mutates_args=())
def mask_key_ranges(leaves: list[Tensor], program: str, length: int, batches: int) -> Tensor:
    """``key_ranges`` as an op (on CPU, whatever device the leaves are on): the passes insert one
    per mask, handed to every attention of that mask."""
    return key_ranges(leaves, program, length, batches)


@mask_key_ranges.register_fake
def _(leaves, program, length, batches):
    return torch.empty(batches, length, 2, dtype=torch.int64)


def batches_of(mask) -> int:
    """The batch size a mask's key ranges are kept for: its first dim when it has batch and
    heads dims ([B, 1, S, S]), else 1 (it broadcasts over the batch)."""
    return mask.shape[0] if mask.dim() == 4 else 1


def pieces(found: list, offset: int, rows: int) -> list[tuple]:
    """The kernel calls (the module doc) for the ``rows`` queries from position ``offset`` (past
    the head count a rank attends a block of the sequence's queries to all of its keys), rows
    counted from ``offset``. Torch's ``is_causal`` aligns the top-left corner, so a causal run
    whose keys start before these rows (a document begun on an earlier rank's block) is two calls
    over the same rows, merged: its earlier keys all visible, then the diagonal."""
    out = []
    for b, r0, r1, k0, k1, kind in found:
        lo, hi = max(r0, offset), min(r1, offset + rows)
        if lo >= hi:
            continue
        if kind == WINDOW:
            out += [(b, s0 - offset, s1 - offset, *keys) for s0, s1, *keys in _window_pieces(lo, hi, r0 - k0 + 1)]
        elif kind == FIXED:
            out.append((b, lo - offset, hi - offset, k0, k1, ALL, False))
        else:
            if k0 < lo:
                out.append((b, lo - offset, hi - offset, k0, lo, ALL, False))
            out.append((b, lo - offset, hi - offset, lo, hi, CAUSAL, k0 < lo))
    return out


def _window_pieces(lo: int, hi: int, width: int) -> list[tuple]:
    """Calls (first row, end row, first key, end key, kind, merge) for rows lo..hi of a sliding
    window (row r sees keys r - width + 1..r), R <= width - 1 rows at a time from row a: the
    diagonal a..a+R causally; the R keys from a - width + 1 FLIPPED (row a + j sees those from
    the j-th on); the keys between, up to a, by every row."""
    if width == 1:  # each row sees only itself
        return [(r, r + 1, r, r + 1, ALL, False) for r in range(lo, hi)]
    out = []
    for a in range(lo, hi, width - 1):
        end = min(a + width - 1, hi)
        low = a - width + 1
        out += [(a, end, a, end, CAUSAL, False), (a, end, low, low + end - a, FLIPPED, True)]
        if low + end - a < a:
            out.append((a, end, low + end - a, a, ALL, True))
    return out


def fused(q: Tensor, k: Tensor, v: Tensor, ranges: Tensor | None, length: int, offset: int) -> list | None:
    """The kernel calls (``pieces``) where torch's fused kernel computes this attention run by
    run: the mask has runs, its batches are q's, and the kernel runs here (CPU for now: CUDA's
    kernels hand back their log-sum-exp in other layouts). Else None."""
    if ranges is None or ranges.shape[0] not in (1, q.shape[0]) or not flash_runs(q, k, v):
        return None
    found = runs(ranges, length)
    calls = None if found is None else pieces(found, offset, q.shape[2])
    return None if calls is None or len(calls) > 2 * _most_runs(length) else calls  # windows of a few keys


def _batch(b: int):
    return slice(None) if b < 0 else slice(b, b + 1)


def _flipped(kind: int, *tensors: Tensor) -> list[Tensor]:
    """The tensors ([B, H, S, D], or log-sum-exps [B, H, S]) in reverse sequence order for a
    FLIPPED call (as they are otherwise): the reverse of a flipped call's rows and keys is causal."""
    return [t.flip(2) if kind == FLIPPED else t for t in tensors]


def forward(q: Tensor, k: Tensor, v: Tensor, calls: list, scale: float, work) -> tuple[Tensor, Tensor]:
    """(output, log-sum-exp) call by call; rows in no call (padding, rows that see no key): zeros
    and -inf, as the blocks give them. A call that ``merge``s adds its keys to the rows' earlier
    call (softmax over both: weights from the two log-sum-exps)."""
    merging = any(call[6] for call in calls)  # then the output adds up in the working precision
    out = q.new_zeros((*q.shape[:-1], v.shape[-1]), dtype=work if merging else q.dtype)
    lse = q.new_full(q.shape[:-1], float("-inf"), dtype=work)
    for b, r0, r1, k0, k1, kind, merge in calls:
        rows, keys = (_batch(b), slice(None), slice(r0, r1)), (_batch(b), slice(None), slice(k0, k1))
        o, l = _flipped(kind, *FLASH(*_flipped(kind, q[rows], k[keys], v[keys]), 0.0, kind != ALL, scale=scale)[:2])
        if merge:
            both = torch.logaddexp(lse[rows], l)
            out[rows] = out[rows] * (lse[rows] - both).exp().unsqueeze(-1) + o * (l - both).exp().unsqueeze(-1)
            lse[rows] = both
        else:
            out[rows], lse[rows] = o, l
    return out.to(q.dtype), lse


def backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, delta: Tensor, lse: Tensor, calls: list,
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) call by call from torch's backward kernel, handed the whole attention's
    log-sum-exp and the stand-in output (its rowsum with the gradient is ``delta``: all the kernel
    reads the output for): each call's share of the gradients, summed."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    standin = standin_output(grad, delta)
    for b, r0, r1, k0, k1, kind, _ in calls:
        rows, keys = (_batch(b), slice(None), slice(r0, r1)), (_batch(b), slice(None), slice(k0, k1))
        inputs = _flipped(kind, grad[rows], q[rows], k[keys], v[keys], standin[rows], lse[rows])
        gq, gk, gv = _flipped(kind, *FLASH_BACKWARD(*inputs, 0.0, kind != ALL, scale=scale)[:3])
        dq[rows] += gq
        dk[keys] += gk
        dv[keys] += gv
    return dq, dk, dv
