"""The Ulysses minimum: the collectives and bytes a rank needs at least (see the package doc)."""
from __future__ import annotations

def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def ulysses_minimum(sdpa_calls: list, loss_bytes: int | None, world_size: int) -> dict:
    """Collectives by kind and bytes handed to them per rank (see the module docstring)."""
    P = world_size
    counts = {"all_to_all": 0, "all_to_all_bytes": 0, "all_reduce": 1, "all_reduce_bytes": loss_bytes or 0}
    for c in sdpa_calls:
        q, k, v, size = c["q"], c["k"], c["v"], c["itemsize"]
        S = q[-2]
        L = -(-S // P)
        hq = q[-3] if len(q) >= 3 else 1
        hk_shape = k[-3] if len(k) >= 3 else 1
        hkv = c["kv_heads"]
        hq_pad = -(-hq // P) * P
        if hkv == hq or hq % P:
            hkv_sent = hq_pad
        elif hkv % P == 0:
            hkv_sent = hkv
        elif P % hkv == 0:
            hkv_sent = P
        else:
            hkv_sent = hq_pad
        per_pos_head = {"q": _numel(q) // (hq * S), "k": _numel(k) // (hk_shape * k[-2]),
                        "v": _numel(v) // (hk_shape * v[-2])}
        out = per_pos_head["q"] // q[-1] * v[-1]  # out has q's batch dims and v's head dim
        one_way = L * size * (hq_pad * (per_pos_head["q"] + out) + hkv_sent * (per_pos_head["k"] + per_pos_head["v"]))
        counts["all_to_all"] += 8
        counts["all_to_all_bytes"] += 2 * one_way
    return counts


def bytes_sent(counts: dict, world_size: int) -> float:
    """Bytes a rank sends to the other ranks, from bytes handed to collectives by kind."""
    P = world_size
    a2a = counts.get("all_to_all_bytes", 0) * (P - 1) / P
    ar = counts.get("all_reduce_bytes", 0) * 2 * (P - 1) / P
    ag = counts.get("all_gather_bytes", 0) * (P - 1)  # its chunk, to every other rank (autosp-wrap)
    rs = counts.get("reduce_scatter_bytes", 0) * (P - 1) / P  # done as an all-to-all (autosp-wrap)
    return a2a + ar + ag + rs
