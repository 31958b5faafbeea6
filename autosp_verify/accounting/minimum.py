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


def halo_minimum(convs: list, world_size: int) -> dict:
    """What convolutions and zero pads along the sequence need at least: each rank sends the positions of its
    chunk that other ranks' outputs read, and in the backward their gradients come back: per
    convolution one exchange each way; bytes of the rank that sends most."""
    P, sent = world_size, [0] * world_size
    if P < 2 or not convs:
        return {}
    overlap = lambda a, b: max(0, min(a[1], b[1]) - max(a[0], b[0]))  # noqa: E731
    for c in convs:
        L = -(-c["seq_len"] // P)
        chunk = lambda q: (q * L, q * L + L)  # noqa: E731
        window = lambda q: (q * L - c["left"], q * L + L + c["right"])  # noqa: E731  (what q's outputs read)
        for r in range(P):
            read_of_mine = sum(overlap(window(q), chunk(r)) for q in range(P) if q != r)
            mine_read = sum(overlap(window(r), chunk(q)) for q in range(P) if q != r)
            sent[r] += (read_of_mine + mine_read) * c["position_bytes"]
    worst = max(sent)
    return {"halo": 2 * len(convs), "halo_bytes": worst, "sent_bytes": worst}


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
