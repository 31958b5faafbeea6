"""Case results, the overall verdict and exit status, and their two renderings (table, JSON).

Statuses, worst first: error (the impl crashed, hung or timed out on a model it accepted), fail
(a mismatch), unsupported (the impl refused the model), skipped (the simulator cannot run here,
e.g. too few GPUs), structural (fake process group: shapes only, never numerics), pass.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

ORDER = ("error", "fail", "unsupported", "skipped", "structural", "pass")
EXIT = {"pass": 0, "structural": 0, "error": 1, "fail": 1, "unsupported": 3, "skipped": 4}
EXIT_USAGE = 2


@dataclass
class CaseResult:
    impl: str
    simulator: str
    world_size: int
    seq_len: int
    batch: int
    dtype: str
    status: str
    structural: bool = False
    loss_abs_err: Optional[float] = None
    max_grad_rel_err: Optional[float] = None
    worst_tensor: Optional[dict] = None  # {"name", "abs_err", "rel_err"}
    worst_grad: Optional[dict] = None  # {"name", "rel_err"}
    error: Optional[str] = None
    failures: list = field(default_factory=list)  # one line per failing tensor, worst first
    tensors: list = field(default_factory=list)  # every check: {"name", "abs_err", "rel_err", "passed"}
    # A failing case only (see divergence.py): the first value that differs, and every value compared.
    first_divergence: Optional[dict] = None  # {"phase", "name", "op", "source", ..., "message"}
    divergence_trace: list = field(default_factory=list)  # [{"name", "op", "phase", "rel_err"}]
    # Cost against the ideal (accounting.py): {"collectives", "memory", "compile_s"}; None when off.
    accounting: Optional[dict] = None
    # Fake simulator: each rank run's collectives through autosp's ops ({"RANK": {kind: count,
    # kind_bytes: bytes}}, forward and backward); None when nothing was counted.
    structural_collectives: Optional[dict] = None
    # Step 1's tensors that agree only to the precision of a coarser dtype the model computes in
    # (autosp_verify/precision.py): {name: dtype}; and {"dtype", "where": the model's line}.
    coarser: dict = field(default_factory=dict)
    computes_in: Optional[dict] = None

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def verdict(cases) -> str:
    statuses = {c.status for c in cases}
    return next((s for s in ORDER if s in statuses), "pass")


def exit_status(cases) -> int:
    return EXIT[verdict(cases)]


def _finite(value):
    """Strict JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def to_json(cases) -> str:
    return json.dumps(_finite({"verdict": verdict(cases), "cases": [c.to_dict() for c in cases]}), indent=2,
                      allow_nan=False)


def _num(x):
    return "-" if x is None else f"{x:.2e}"


def _first_line(text: str) -> str:
    """Compiler errors run to pages: the table shows the first line, the JSON keeps it all."""
    first, _, rest = text.strip().partition("\n")
    return first + (" [...]" if rest.strip() else "")


def _bytes(n):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 999.5 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000


def _kinds(counts: dict) -> str:
    """all-to-alls/all-reduces, and all-gathers and halo exchanges when there are any ("+4ag+4h")."""
    gathers, halos = counts.get("all_gather", 0), counts.get("halo", 0)
    return (f"{counts.get('all_to_all', 0)}/{counts.get('all_reduce', 0)}" + (f"+{gathers}ag" if gathers else "")
            + (f"+{halos}h" if halos else ""))


def _accounting_cells(c, memory_column: bool, compile_column: bool) -> tuple:
    """a2a/ar (min), sent/rank (min)[, mem/rank (1/P)][, compile s (no SP)]: measured (ideal).
    mem/rank counts every sequence-long saved tensor, [S, S] ones included ("+[S,S]": a rank
    holds some)."""
    acc = c.accounting or {}
    coll, mem = acc.get("collectives") or {}, acc.get("memory") or {}
    low, got = coll.get("minimum"), coll.get("measured")
    kinds = "-" if got is None else _kinds(got)
    cells = [f"{kinds} ({_kinds(low)})" if low else "-",
             f"{'-' if got is None else _bytes(got['bytes_sent'])} ({_bytes(low['bytes_sent'])})" if low else "-"]
    if memory_column:
        squared = " +[S,S]" if mem.get("rank_seq2_bytes") else ""  # a rank holds tensors quadratic in S
        cells.append("-" if mem.get("ratio") is None else f"{mem['ratio']:.2f} ({1 / c.world_size:.2f}){squared}")
    if compile_column:
        times = acc.get("compile_s")
        cells.append("-" if not times else f"{times['with_passes']:.1f} ({times['without']:.1f}) {times['ratio']:.2f}x")
    return tuple(cells)


def _no_sp(case) -> str:
    """The verdict's mark for a case where every rank held the whole sequence (exact, not SP)."""
    sp = (case.accounting or {}).get("sequence_parallel")
    return f" (NO SP: a rank saves {sp['saved_ratio']:.2f}x one device)" if sp and not sp["happened"] else ""


def _no_memory_saved(case) -> str:
    """The mark for a case whose sequence was split (chunks moved) but whose largest rank saves
    as much for its backward as one device (what stays whole outweighs what was split)."""
    sp = (case.accounting or {}).get("sequence_parallel")
    if not sp or not sp["happened"] or sp["memory_saved"]:
        return ""
    return f" (NO MEMORY SAVED: a rank saves {sp['saved_ratio']:.2f}x one device's activations)"


def _coarser_note(case) -> str:
    names, dtype = list(case.coarser), case.computes_in["dtype"]
    return (f"{len(names)} tensor{'s' * (len(names) > 1)} agree to {dtype}'s precision only (compared at its "
            f"tolerance: {', '.join(names[:2])}{', ...' if len(names) > 2 else ''}): the model computes in "
            f"{dtype} (first at {case.computes_in['where']})")


def format_table(cases) -> str:
    shown = any(c.accounting for c in cases)
    timed = any((c.accounting or {}).get("compile_s") for c in cases)
    measured = any(((c.accounting or {}).get("memory") or {}).get("ratio") is not None for c in cases)
    extra = (("a2a/ar (min)", "sent/rank (min)") + (("mem/rank (1/P)",) if measured else ())
             + (("compile s (no SP)",) if timed else ()) if shown else ())
    rows = [("impl", "simulator", "P", "S", "loss err", "worst grad (rel err)", *extra, "verdict")]
    for c in cases:
        grad = "-" if c.worst_grad is None else f"{c.worst_grad['name']} ({_num(c.worst_grad['rel_err'])})"
        rows.append((c.impl, c.simulator, str(c.world_size), str(c.seq_len), _num(c.loss_abs_err), grad,
                     *(_accounting_cells(c, measured, timed) if shown else ()),
                     c.status.upper() + _no_sp(c) + _no_memory_saved(c)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        case = cases[i - 1] if i else None
        if case and (case.error or case.failures):
            for detail in ([_first_line(case.error)] if case.error else []) + case.failures[:5]:
                lines.append(f"    {detail}")
        if case and case.first_divergence:
            lines.append(f"    first divergence: {case.first_divergence['message']}")
        if case and case.coarser:
            lines.append(f"    {_coarser_note(case)}")
        per_rank = list((case.structural_collectives or {}).values()) if case else []
        if per_rank and all(c == per_rank[0] for c in per_rank):  # disagreeing ranks: in the failures
            kinds = ", ".join(f"{k} {n}" for k, n in per_rank[0].items() if not k.endswith("_bytes"))
            lines.append(f"    collectives per rank (autosp's ops, ranks {', '.join(case.structural_collectives)}): "
                         f"{kinds}")
    return "\n".join(lines)


def summary(cases) -> str:
    counts = {s: sum(c.status == s for c in cases) for s in ORDER}
    parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    unsplit = sum(bool(_no_sp(c)) for c in cases)
    parts += f"; {unsplit} without sequence parallelism" if unsplit else ""
    unsaved = sum(bool(_no_memory_saved(c)) for c in cases)
    parts += f"; {unsaved} saving no activation memory" if unsaved else ""
    return f"verdict: {verdict(cases)} ({len(cases)} case{'s' * (len(cases) != 1)}: {parts})"
