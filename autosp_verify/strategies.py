"""Hypothesis strategies for sequence-parallel cases: SP degrees, head counts, sequence lengths.

Values are built, never filtered (no ``assume``, no health-check trouble), and each strategy
shrinks toward the small, awkward end: the smallest P, the fewest heads, a length P does not
divide. Defaults match what the project's own property test draws
(tests/property/test_autosp_properties.py).

* :func:`world_sizes` -- SP degrees P: powers of two up to ``max_size`` (or any integer).
* :func:`head_counts` -- ``(q_heads, kv_heads)`` with ``kv_heads`` dividing ``q_heads`` (GQA;
  equal is plain MHA), ``q_heads >= P`` by default (fewer is a documented autosp refusal), and on
  request only counts P divides (``divisible=True``) or only counts it does not (``False``:
  padded heads).
* :func:`seq_lens` -- sequence lengths favouring lengths P does not divide and lengths below P
  (ranks with an empty shard); ``divisible=True`` / ``False`` for only one kind.
* :func:`head_dims`, :func:`batch_sizes`, :func:`dtypes` -- the small remaining axes.
* :func:`sp_cases` -- all of the above at once, as an :class:`SPCase`.

Example::

    from hypothesis import given
    from autosp_verify import assert_sp_equivalent
    from autosp_verify.strategies import sp_cases

    @given(sp_cases(max_world_size=4))
    def test_my_impl(case):
        assert_sp_equivalent(lambda: MyModel(case.heads, case.kv_heads, case.head_dim), inputs_fn,
                             impl="autosp", **case.verify_kwargs())
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

__all__ = ["SPCase", "batch_sizes", "dtypes", "head_counts", "head_dims", "seq_lens", "sp_cases", "world_sizes"]


def world_sizes(max_size: int = 8, *, min_size: int = 1, powers_of_two: bool = True) -> st.SearchStrategy[int]:
    """SP degrees P in ``[min_size, max_size]``: powers of two (1, 2, 4, 8 by default), or every
    integer with ``powers_of_two=False``. Shrinks toward ``min_size``."""
    if min_size < 1 or max_size < min_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
    if not powers_of_two:
        return st.integers(min_size, max_size)
    sizes = [1 << k for k in range(max_size.bit_length()) if min_size <= 1 << k <= max_size]
    if not sizes:
        raise ValueError(f"no power of two in [{min_size}, {max_size}]")
    return st.sampled_from(sizes)


def _check_divisible_request(divisible, world_size, what):
    if divisible is False and world_size == 1:
        raise ValueError(f"{what}: divisible=False needs world_size >= 2 (1 divides everything)")


def head_counts(world_size: int, *, max_kv_heads: int = 4, max_group: int = 4, divisible: bool | None = None,
                at_least_world_size: bool = True) -> st.SearchStrategy[tuple]:
    """``(q_heads, kv_heads)`` pairs valid for grouped-query attention at SP degree ``world_size``.

    ``kv_heads`` is in ``[1, max_kv_heads]`` and divides ``q_heads``; ``q_heads`` is at most
    ``max_kv_heads * max_group`` (raised to reach P when needed). With ``at_least_world_size``
    (default) ``q_heads >= P``. ``divisible``: None any count, True only counts P divides, False
    only counts P does not divide (needs P >= 2). Shrinks toward the fewest heads."""
    _check_divisible_request(divisible, world_size, "head_counts")
    if world_size < 1 or max_kv_heads < 1 or max_group < 1:
        raise ValueError("head_counts: world_size, max_kv_heads and max_group must be positive")
    low = world_size if at_least_world_size else 1
    # Room for q = P (any, divisible) and q = P + 1 (not divisible), whatever the maxima say.
    max_q = max(max_kv_heads * max_group, world_size + (divisible is False))
    pairs = sorted((q, kv) for kv in range(1, max_kv_heads + 1) for q in range(kv, max_q + 1, kv)
                   if q >= low and (divisible is None or (q % world_size == 0) == divisible))
    return st.sampled_from(pairs)


@st.composite
def _seq_len(draw, world_size, min_len, max_len, divisible):
    p = world_size
    multiples = [s for s in range(min_len, max_len + 1) if s % p == 0]
    ragged = [s for s in range(min_len, max_len + 1) if s % p]
    if divisible is True:
        return draw(st.sampled_from(multiples))
    if divisible is False:
        return draw(st.sampled_from(ragged))
    tiny = [s for s in range(min_len, max_len + 1) if s < p]
    # One branch per kind (empty kinds left out), ragged twice: half the draws are lengths P
    # does not divide. sampled_from shrinks to the first branch, then to the shortest length.
    kinds = [k for k in (ragged, tiny, ragged, multiples) if k]
    return draw(st.sampled_from(draw(st.sampled_from(kinds))))


def seq_lens(world_size: int, *, min_len: int = 2, max_len: int | None = None,
             divisible: bool | None = None) -> st.SearchStrategy[int]:
    """Sequence lengths in ``[min_len, max_len]`` (default ``3 * P + 3``: a few shards each).

    ``divisible=None`` favours lengths P does not divide (about half the draws) and lengths below
    P (some ranks hold an empty shard), and still draws multiples of P; True only multiples of P;
    False only non-multiples (needs P >= 2). ``min_len`` defaults to 2: with shifted labels a
    length-1 sequence has no target at all."""
    _check_divisible_request(divisible, world_size, "seq_lens")
    max_len = 3 * world_size + 3 if max_len is None else max_len
    if min_len < 1 or max_len < min_len:
        raise ValueError(f"seq_lens: need 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if divisible is True and max_len // world_size * world_size < min_len:
        raise ValueError(f"seq_lens: no multiple of {world_size} in [{min_len}, {max_len}]")
    if divisible is False and min_len == max_len and min_len % world_size == 0:
        raise ValueError(f"seq_lens: no non-multiple of {world_size} in [{min_len}, {max_len}]")
    return _seq_len(world_size, min_len, max_len, divisible)


def head_dims(choices=(2, 4)) -> st.SearchStrategy[int]:
    """Head dims; even by default (RoPE rotates halves)."""
    return st.sampled_from(list(choices))


def batch_sizes(max_batch: int = 3) -> st.SearchStrategy[int]:
    return st.integers(1, max_batch)


def dtypes(choices=(torch.float64, torch.float32)) -> st.SearchStrategy[torch.dtype]:
    """Case dtypes; float64 first (exact comparisons, and what failures shrink to)."""
    return st.sampled_from(list(choices))


@dataclass(frozen=True)
class SPCase:
    """One drawn case: the verification shape plus the attention architecture."""

    world_size: int
    batch: int
    seq_len: int
    heads: int  # query heads
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def verify_kwargs(self) -> dict:
        """The keywords :func:`autosp_verify.verify` / ``assert_sp_equivalent`` take from a case."""
        return {"world_size": self.world_size, "seq_len": self.seq_len, "batch": self.batch, "dtype": self.dtype}


@st.composite
def sp_cases(draw, *, max_world_size: int = 8, world_size=None, heads_divisible: bool | None = None,
             seq_divisible: bool | None = None, max_kv_heads: int = 4, max_group: int = 4, max_len: int | None = None,
             max_batch: int = 3, head_dim_choices=(2, 4), dtype_choices=(torch.float64, torch.float32)) -> SPCase:
    """An :class:`SPCase`: P from :func:`world_sizes` (or ``world_size``: an int or a strategy),
    heads from :func:`head_counts`, the length from :func:`seq_lens`, and batch, head dim and
    dtype. A ``*_divisible=False`` request at P = 1 draws P = 2 instead."""
    if world_size is None:
        world_size = world_sizes(max_world_size)
    p = draw(world_size) if isinstance(world_size, st.SearchStrategy) else world_size
    if p == 1 and False in (heads_divisible, seq_divisible):
        p = 2
    heads, kv_heads = draw(head_counts(p, max_kv_heads=max_kv_heads, max_group=max_group, divisible=heads_divisible))
    seq_len = draw(seq_lens(p, max_len=max_len, divisible=seq_divisible))
    return SPCase(world_size=p, batch=draw(batch_sizes(max_batch)), seq_len=seq_len, heads=heads, kv_heads=kv_heads,
                  head_dim=draw(head_dims(head_dim_choices)), dtype=draw(dtypes(dtype_choices)))
