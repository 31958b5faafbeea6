"""Plain-text tables and a PNG of the scale simulator's results."""
from __future__ import annotations

import re
from dataclasses import dataclass

from autosp_verify.scale.simulate import PARTS, Point, Scenario

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_TOKENS = {"": 1, "k": 2**10, "m": 2**20}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``80GB``, ``1.5TiB`` or a number of bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size (e.g. 80GiB, 80GB, 1.5TiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_tokens(text: str) -> int:
    """``131072``, ``128k`` (x1024) or ``1M`` (x1024^2)."""
    m = re.fullmatch(r"\s*([0-9]+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a sequence length (e.g. 131072, 128k, 1M)")
    return int(m.group(1)) * _TOKENS[m.group(2).lower()]


def gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def tokens(n: int) -> str:
    if n >= 2**20 and n % 2**20 == 0:
        return f"{n // 2**20}M"
    if n >= 2**10 and n % 2**10 == 0:
        return f"{n // 2**10}k"
    return f"{n / 1000:.1f}k" if n >= 10000 else str(n)


def _table(header: list, rows: list) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)])


def points_table(points: list, refused: dict) -> str:
    """Per-rank peak (GiB) of each scenario at each length, broken down."""
    header = ["scenario", "S", *[p.replace("_", "-") for p in PARTS], "peak/rank", "at"]
    rows = []
    for p in points:
        rows.append([p.scenario.label, tokens(p.seq_len), *[gib(p.parts[k]) for k in PARTS], gib(p.total),
                     f"{p.phase}: {p.where}"])
    for label, why in refused.items():
        rows.append([label, "-", *["" for _ in PARTS], "refused", why])
    return "per-rank peak memory of one training step (GiB)\n" + _table(header, rows)


@dataclass
class Longest:
    scenario: Scenario
    tokens: int | None  # None: refused
    why: str = ""


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def longest_table(results: list, budget: int) -> str:
    """Longest trainable S per scenario, with its ratio to P=1 (same impl and checkpointing),
    to one device and to plain DP on as many ranks."""
    def find(impl, ranks, ckpt):
        return next((r.tokens for r in results if r.scenario.impl == impl and r.scenario.ranks == ranks
                     and r.scenario.checkpointing == ckpt and r.tokens is not None), None)
    header = ["scenario", "ranks", "longest S", "vs P=1", "(vs P=1)/P", "vs one device", "vs plain DP"]
    rows = []
    for r in results:
        sc = r.scenario
        if r.tokens is None:
            rows.append([sc.label, sc.ranks, "refused", "", "", "", r.why])
            continue
        base = find(sc.impl if sc.impl != "plain_dp" else "one_device", 1, sc.checkpointing)
        one = find("one_device", 1, sc.checkpointing)
        dp = find("plain_dp", sc.ranks, sc.checkpointing) if sc.ranks > 1 else None
        ratio = r.tokens / base if r.tokens and base else None
        rows.append([sc.label, sc.ranks, tokens(r.tokens) if r.tokens else "does not fit",
                     _ratio(r.tokens, base), f"{ratio / sc.ranks:.2f}" if ratio else "-",
                     _ratio(r.tokens, one), _ratio(r.tokens, dp) if sc.impl == "autosp" else "-"])
    return f"longest trainable sequence within {gib(budget)} GiB per rank\n" + _table(header, rows)


def _left(ax, curves: dict, budget: int) -> None:
    """Per-rank peak against S: one device and autosp at each P (colour: P; dashed: selective
    checkpointing); plain DP left out (it follows one device)."""
    colours = {}
    for (sc, pts) in curves.values():
        if sc.impl == "plain_dp":
            continue
        colour = colours.setdefault((sc.impl, sc.ranks), f"C{len(colours) % 10}")
        ax.loglog([p.seq_len for p in pts], [p.total / 2**30 for p in pts], "--" if sc.checkpointing else "-",
                  color=colour, label=sc.label)
    ax.axhline(budget / 2**30, color="k", ls=":", lw=1, label=f"budget {gib(budget)} GiB")
    ax.set_xlabel("sequence length S (tokens)")
    ax.set_ylabel("per-rank peak of one training step (GiB)")
    ax.legend(fontsize="x-small", ncol=2)


def _right(ax, results: list, budget: int) -> None:
    for impl, ckpt in sorted({(r.scenario.impl, r.scenario.checkpointing) for r in results}, key=str):
        pts = sorted((r.scenario.ranks, r.tokens) for r in results if r.tokens and r.scenario.impl == impl
                     and r.scenario.checkpointing == ckpt)
        if pts:
            ax.loglog(*zip(*pts), "o--" if ckpt else "o-", label=f"{impl}{', selective ckpt' if ckpt else ''}")
    base = [r for r in results if r.scenario.impl == "autosp" and r.scenario.ranks == 1 and r.tokens
            and not r.scenario.checkpointing]
    if base:
        ranks = sorted({r.scenario.ranks for r in results})
        ax.loglog(ranks, [base[0].tokens * p for p in ranks], "k:", label="P x (autosp P=1)")
    ax.set_xlabel("ranks (SP x DP as given; past the head count SP = Ulysses x gathered-kv blocks)")
    ax.set_ylabel(f"longest S within {gib(budget)} GiB per rank")
    ax.legend(fontsize="x-small")


def write_png(curves: dict, results: list, budget: int, path: str, title: str = "") -> str:
    """Left: per-rank peak against S per scenario, with the budget. Right: the longest S that
    fits against the number of ranks, with P times autosp's P=1 length. ``curves``: label ->
    (scenario, points)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    _left(left, curves, budget)
    _right(right, results, budget)
    fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100)
    return path


def to_json(points: list, results: list, meta: dict) -> dict:
    def sc(s: Scenario):
        return {"impl": s.impl, "sp": s.sp, "dp": s.dp, "checkpointing": s.checkpointing}
    return {"meta": meta,
            "points": [{**sc(p.scenario), "seq_len": p.seq_len, "total": p.total, "parts": p.parts,
                        "phase": p.phase, "where": p.where} for p in points],
            "longest": [{**sc(r.scenario), "tokens": r.tokens, "why": r.why} for r in results]}


__all__ = ["Longest", "Point", "longest_table", "parse_bytes", "parse_tokens", "points_table", "to_json", "write_png"]
