"""The accounting of one case, from the probe's data on the reference and the ranks."""
from __future__ import annotations

import dataclasses

from autosp_verify.accounting.compile_time import compile_times
from autosp_verify.accounting.minimum import bytes_sent, halo_minimum, ulysses_minimum
from autosp_verify.accounting.probe import NAME
from autosp_verify.accounting.saved import baseline_saved, classify

# Inner backend -> the single-device backend that saves the same set of tensors.
BASELINE_BACKEND = {"eager": "eager", "aot_eager": "aot_eager", "inductor": "aot_eager_decomp_partition"}
# --compile-time: pairs of compiles per case, the ratio their median (one compile moves +-25% run to run).
COMPILE_PAIRS = 3


def _baseline_backend(rank_data: list):
    backends = {d.get("backend") for d in rank_data}
    if len(backends) == 1 and (backend := backends.pop()) in BASELINE_BACKEND:
        return BASELINE_BACKEND[backend], f"torch.compile(backend={BASELINE_BACKEND[backend]!r}), no passes"
    if any(d.get("compiled") for d in rank_data):
        return "aot_eager_decomp_partition", "torch.compile(backend='aot_eager_decomp_partition') (impl compiled, backend unknown)"
    return None, "eager"


def _handed(counts: dict) -> int:
    """Bytes handed to collectives, every kind."""
    return sum(v for k, v in counts.items() if k.endswith("_bytes") and k != "sent_bytes")


def _collectives(spec, ref_data, rank_data):
    minimum = ulysses_minimum(ref_data.get("sdpa", []), ref_data.get("loss_bytes"), spec.world_size)
    for kind, n in halo_minimum(ref_data.get("convs", []), spec.world_size).items():
        minimum[kind] = minimum.get(kind, 0) + n
    out = {"minimum": {**{k: v for k, v in minimum.items() if not k.endswith("_bytes")},
                       "bytes_sent": bytes_sent(minimum, spec.world_size),
                       "bytes_handed": _handed(minimum)},
           "per_rank": None, "measured": None, "at_minimum": None}
    counts = [d.get("collectives") for d in rank_data]
    if counts and all(c is not None for c in counts):
        per_rank = []
        for c in counts:
            kinds = {k: v for k, v in c.items() if not k.endswith("_bytes")}
            handed = _handed(c)
            per_rank.append({**kinds, "bytes_sent": bytes_sent(c, spec.world_size), "bytes_handed": handed})
        out["per_rank"] = per_rank
        worst = max(per_rank, key=lambda r: r["bytes_sent"])
        out["measured"] = worst
        kinds = {k for k in minimum if not k.endswith("_bytes")}
        kinds |= {k for k in worst if k not in ("bytes_sent", "bytes_handed")}
        out["at_minimum"] = (all(worst.get(k, 0) == minimum.get(k, 0) for k in kinds)
                             and worst["bytes_handed"] <= out["minimum"]["bytes_handed"])
    return out


NO_SP_RATIO = 0.9  # a rank saving this share of one device's activations or more: no memory saved
SEQUENCE_COLLECTIVES = ("all_to_all", "all_gather", "reduce_scatter")  # what moves sequence chunks


def sequence_parallel(ref_data, rank_data, world_size, collectives=None) -> dict | None:
    """Whether the sequence was split and whether that saved activation memory, from what every
    case measures anyway: the activations the largest rank saves for its backward over the one
    device's (about 1/P plus what stays whole when split; 1 or more when every rank ran the whole
    sequence, which is exact too), and the collectives that move sequence chunks. A split that
    saves nothing is real (a model whose saved activations are mostly outside the split layers:
    activation checkpointing under autosp-wrap) and is said as such, not as no split.
    None at P=1 or when nothing was recorded."""
    ref_bytes = sum(b for _, b in ref_data.get("saved") or [])
    ranks = [sum(b for _, b in d.get("saved") or []) for d in rank_data if d.get("saved") is not None]
    if world_size < 2 or not ref_bytes or not ranks:
        return None
    ratio = max(ranks) / ref_bytes
    measured = (collectives or {}).get("measured") or {}
    moved = any(measured.get(kind, 0) for kind in SEQUENCE_COLLECTIVES)
    return {"saved_ratio": ratio, "memory_saved": ratio < NO_SP_RATIO, "happened": ratio < NO_SP_RATIO or moved}


def _memory(spec, base, batch, batch2, rank_data, rank_data2):
    backend, how = _baseline_backend(rank_data)
    S2 = spec.seq_len + spec.world_size
    ref_s = baseline_saved(base, batch, spec.seq_len, spec.seed, backend)
    ref = classify(ref_s, baseline_saved(base, batch2, S2, spec.seed, backend)) if batch2 is not None else None
    ranks = [classify(a["saved"], b["saved"]) for a, b in zip(rank_data, rank_data2)] if rank_data2 else []
    P, S = spec.world_size, spec.seq_len
    out = {"baseline": how, "reference_bytes": sum(b for _, b in ref_s),
           "rank_bytes": [sum(b for _, b in d["saved"]) for d in rank_data], "ideal": 1 / P,
           "ideal_padded": -(-S // P) / S}
    out["total_ratio"] = max(out["rank_bytes"]) / out["reference_bytes"] if out["reference_bytes"] else None
    if ref is not None and ranks and all(r is not None for r in ranks):
        out["reference"], out["ranks"] = ref, ranks
        seq_long = [r["seq"] + r["seq2"] for r in ranks]  # [S, S] tensors are sequence-long too
        out["ratio"] = max(seq_long) / (ref["seq"] + ref["seq2"]) if ref["seq"] + ref["seq2"] else None
        out["activation_ratio"] = max(r["seq"] for r in ranks) / ref["seq"] if ref["seq"] else None
        out["seq2_ratio"] = max(r["seq2"] for r in ranks) / ref["seq2"] if ref["seq2"] else None
        out["rank_seq2_bytes"] = max(r["seq2"] for r in ranks)
    else:
        out["ratio"] = None
        out["note"] = ("sequence-long tensors not told apart: " +
                       ("no run at S+P" if batch2 is None else "the run at S+P saved a different set of tensors"))
    return out


def _longer_batch(spec, base, inputs_fn):
    """The spec and batch at S + P (same seed, same padding), for the run that tells
    sequence-long tensors apart."""
    from autosp_verify.core import build_case
    spec2 = dataclasses.replace(spec, seq_len=spec.seq_len + spec.world_size, probes=(NAME,), weights_path=None)
    return spec2, build_case(lambda: base, inputs_fn, spec2)[1]


def account(case, ranks, *, memory=True) -> dict:
    """The case's accounting from the probe data of its reference and its ranks (``case``: a
    :class:`autosp_verify.run.Case`). ``memory``: also the activation memory, which runs the ranks
    again on a batch P positions longer (``case.run``) and the single-device model twice."""
    spec, base, batch = case.spec, case.base, case.batch
    ref_data = case.ref.probes.get(NAME) or {}
    ranks = [r for r in ranks if r is not None]  # the fake simulator runs only some ranks
    rank_data = [(r.get("probes") or {}).get(NAME) or {} for r in ranks]
    result = {"collectives": _collectives(spec, ref_data, rank_data)}
    sp = sequence_parallel(ref_data, rank_data, spec.world_size, result["collectives"])
    if sp is not None:
        result["sequence_parallel"] = sp
    if memory and rank_data and all(d.get("saved") is not None for d in rank_data):
        batch2, ranks2 = None, None
        try:
            spec2, batch2 = _longer_batch(spec, base, case.inputs_fn)
            ranks2 = [r["probes"][NAME] for r in case.run(spec2, batch2) if r is not None]
        except Exception as exc:  # noqa: BLE001 (reported: the accounting never fails a case)
            result["memory_note"] = f"the run at S+P failed: {type(exc).__name__}: {exc}"
            batch2 = None
        result["memory"] = _memory(spec, base, batch, batch2, rank_data, ranks2)
    return result


def account_case(case, ranks, *, memory=False, compile_time=False) -> dict:
    """:func:`account` (and :func:`compile_times`) for run_case. Never raises: a failure is reported."""
    try:
        result = account(case, ranks, memory=memory)
        if compile_time:
            result["compile_s"] = compile_times(case.spec, case.base, case.batch, pairs=COMPILE_PAIRS)
    except Exception as exc:  # noqa: BLE001 (reported: the accounting never fails a case)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    return result
