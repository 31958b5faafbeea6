"""How a sequence is split over the ranks, and how far grouped key/value heads are repeated."""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ChunkLayout:
    """A sequence of ``length`` positions over ``world_size`` ranks: ``local_len`` = ceil(S/P) each,
    contiguous, in rank order; the end is padded to ``padded_len``, so the last ranks may hold
    fewer real positions (``valid_local``) or none."""
    length: int
    world_size: int
    rank: int

    @property
    def local_len(self) -> int:
        return max(1, -(-self.length // self.world_size))

    @property
    def padded_len(self) -> int:
        return self.local_len * self.world_size

    @property
    def start(self) -> int:
        return self.rank * self.local_len

    @property
    def valid_local(self) -> int:
        return max(0, min(self.local_len, self.length - self.start))

    @classmethod
    def of(cls, length: int, group: dist.ProcessGroup) -> "ChunkLayout":
        return cls(length, dist.get_world_size(group), dist.get_rank(group))


def kv_heads_sent(q_heads: int, kv_heads: int, ulysses: int) -> int:
    """Key/value heads an all-to-all over ``ulysses`` ranks carries (see ``kv_repeats``)."""
    q_padded = -(-q_heads // ulysses) * ulysses
    if kv_heads == q_heads or q_heads % ulysses:
        return q_padded
    if kv_heads % ulysses == 0:
        return kv_heads
    if ulysses % kv_heads == 0:
        return ulysses
    return q_padded


def _elements_sent(q_heads: int, kv_heads: int, world_size: int, ulysses: int) -> float:
    """Head-vectors a rank sends per position it holds, forward and backward (equal head sizes)."""
    u, r = ulysses, world_size // ulysses
    q_padded, kv = -(-q_heads // u) * u, kv_heads_sent(q_heads, kv_heads, u)
    return 2 * (2 * q_padded + 2 * kv) * (u - 1) / u + 2 * 2 * kv * (r - 1)


def sp_degrees(q_heads: int, world_size: int, ulysses: int | None = None,
               kv_heads: int | None = None) -> tuple[int, int]:
    """(U, R): Ulysses over blocks of U ranks (heads), keys and values gathered over the R = P / U
    blocks (queries stay local). All Ulysses when there are at least P query heads; past the head
    count, the U dividing P and at most the query heads that sends the fewest bytes (kv heads a
    wide Ulysses would replicate can cost more than gathering them), the larger U on a tie.
    ``ulysses`` fixes U (it must divide P)."""
    if ulysses is not None:
        if ulysses < 1 or world_size % ulysses:
            raise ValueError(f"ulysses={ulysses} must divide the group size {world_size}")
        return ulysses, world_size // ulysses
    if q_heads >= world_size:
        return world_size, 1
    candidates = [u for u in range(1, q_heads + 1) if world_size % u == 0]
    kv = kv_heads or q_heads
    u = min(candidates, key=lambda u: (_elements_sent(q_heads, kv, world_size, u), -u))
    return u, world_size // u


def kv_repeats(q_heads: int, kv_heads: int, world_size: int, gqa: bool) -> tuple[int, bool]:
    """How often to repeat each key/value head before the all-to-all, and whether attention still
    groups query heads (``enable_gqa``), so that each rank holds the kv heads of its query heads:
    none when P divides both head counts; P / Hkv copies when Hkv divides P; every query head's
    own copy otherwise, and whenever P does not divide the query heads (they are padded, and the
    padding would straddle groups)."""
    if kv_heads == q_heads or not gqa:
        return 1, gqa
    if q_heads % world_size:
        return q_heads // kv_heads, False
    if kv_heads % world_size == 0:
        return 1, True
    if world_size % kv_heads == 0:
        return world_size // kv_heads, True
    return q_heads // kv_heads, False
