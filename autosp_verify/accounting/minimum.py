"""The Ulysses minimum: the collectives and bytes a rank needs at least (see the package doc)."""
from __future__ import annotations

def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def ulysses_minimum(sdpa_calls: list, loss_bytes: int | None, world_size: int, ulysses: int | None = None) -> dict:
    """Collectives by kind, bytes handed to them and bytes sent (``sent_bytes``) per rank (see the
    package doc). Past the head count, for the layout the compiler picks
    (``autosp.collectives.sp_degrees``; ``ulysses`` fixes U): Ulysses over U ranks, keys and values
    gathered over R."""
    from autosp.collectives.layout import kv_heads_sent, sp_degrees
    P = world_size
    counts = {"all_to_all": 0, "all_to_all_bytes": 0, "all_reduce": 1, "all_reduce_bytes": loss_bytes or 0,
              "sent_bytes": (loss_bytes or 0) * 2 * (P - 1) / P}
    for c in sdpa_calls:
        q, k, v, size = c["q"], c["k"], c["v"], c["itemsize"]
        S = q[-2]
        L = -(-S // P)
        hq = q[-3] if len(q) >= 3 else 1
        U, R = sp_degrees(hq, P, ulysses, c["kv_heads"])
        hk_shape = k[-3] if len(k) >= 3 else 1
        hq_pad, hkv_sent = -(-hq // U) * U, kv_heads_sent(hq, c["kv_heads"], U)
        per_pos_head = {"q": _numel(q) // (hq * S), "k": _numel(k) // (hk_shape * k[-2]),
                        "v": _numel(v) // (hk_shape * v[-2])}
        out = per_pos_head["q"] // q[-1] * v[-1]  # out has q's batch dims and v's head dim
        one_way = L * size * (hq_pad * (per_pos_head["q"] + out) + hkv_sent * (per_pos_head["k"] + per_pos_head["v"]))
        counts["all_to_all"] += 8
        counts["all_to_all_bytes"] += 2 * one_way
        counts["sent_bytes"] += 2 * one_way * (U - 1) / U
        if R > 1:  # this rank's keys and values (its heads, its block's U*L positions) to R-1 blocks, and back
            kv = L * size * hkv_sent * (per_pos_head["k"] + per_pos_head["v"])
            for kind in ("all_gather", "reduce_scatter"):
                counts[kind] = counts.get(kind, 0) + 2
                counts[kind + "_bytes"] = counts.get(kind + "_bytes", 0) + kv * R
            counts["sent_bytes"] += 2 * kv * (R - 1)
    return counts


def bytes_sent(counts: dict, world_size: int) -> float:
    """Bytes a rank sends to the other ranks: ``sent_bytes`` where autosp's runtime counted them,
    else from the bytes handed to collectives by kind (impls whose collectives torch logged)."""
    if "sent_bytes" in counts:
        return counts["sent_bytes"]
    P = world_size
    a2a = counts.get("all_to_all_bytes", 0) * (P - 1) / P
    ar = counts.get("all_reduce_bytes", 0) * 2 * (P - 1) / P
    ag = counts.get("all_gather_bytes", 0) * (P - 1)  # its chunk, to every other rank (autosp-wrap)
    rs = counts.get("reduce_scatter_bytes", 0) * (P - 1) / P  # done as an all-to-all (autosp-wrap)
    return a2a + ar + ag + rs
