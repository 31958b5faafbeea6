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
