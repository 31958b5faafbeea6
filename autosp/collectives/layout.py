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


ONCE_MAX_EXTRA = 0.02  # SPConfig(attention_output="auto"): "once" when it adds at most this much


def output_held_once(q_heads: int, kv_heads_sent: int, ulysses: int, head_dim: int, itemsize: int) -> bool:
    """Whether ``attention_output="auto"`` holds an attention's output once (``attention_to_seq``):
    that sends one more value per query head and position in the backward's all-to-all (two for
    half precision, whose rowsum(dO * O) is float32), against (q + k + v + output) heads x
    ``head_dim`` each way; taken when that is at most ``ONCE_MAX_EXTRA`` more."""
    padded_q = -(-q_heads // ulysses) * ulysses
    extra = padded_q * max(1, 4 // itemsize)
    moved = 2 * (2 * padded_q + 2 * kv_heads_sent) * head_dim
    return extra <= ONCE_MAX_EXTRA * moved


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
