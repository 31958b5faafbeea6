"""The figure of a run (``--report DIR``): per-rank activation memory against P, and the error
of each value along the execution order of a failing case (from its first-divergence trace)."""
from __future__ import annotations

import math

def _plottable(err) -> float:
    """A relative error for a log axis: exact matches at 1e-18, inf/nan/missing left out."""
    try:
        err = float(err)
    except (TypeError, ValueError):
        return math.nan
    return max(err, 1e-18) if math.isfinite(err) else math.nan


def write_png(cases, path: str) -> str:
    """Per-rank activation memory against P (with the ideal 1/P) and, for failing cases with a
    divergence trace, the error of each value along the execution order. Returns ``path``."""
    # Imported here (matplotlib is optional), and without pyplot: no global backend state.
    from matplotlib.figure import Figure

    failing = [c for c in cases if c.status == "fail" and getattr(c, "divergence_trace", None)]
    fig = Figure(figsize=(6.4 * (1 + bool(failing)), 4.8), layout="constrained")
    axes = fig.subplots(1, 1 + bool(failing), squeeze=False)[0]
    ax = axes[0]
    series = {}
    for c in cases:
        mem = (getattr(c, "accounting", None) or {}).get("memory") or {}
        if mem.get("ratio") is not None:
            series.setdefault(f"{c.impl}, S={c.seq_len}", []).append((c.world_size, mem["ratio"]))
    sizes = sorted({p for points in series.values() for p, _ in points})
    if sizes:
        grid = list(range(1, max(sizes) + 1))
        fine = [1 + i * (max(sizes) - 1) / 200 for i in range(201)]
        ax.plot(fine, [1 / p for p in fine], "k--", label="ideal 1/P")
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p for p, _ in points], [r for _, r in points], "o-", label=label)
        ax.set_xticks(grid)
        ax.set_ylim(0, max(1.05, *(r for points in series.values() for _, r in points)))
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no memory figures in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("ranks P")
    ax.set_ylabel("sequence-long activations per rank / one device")
    ax.set_title("per-rank activation memory (largest rank)")
    if failing:
        ax = axes[1]
        for c in failing[:4]:
            trace = c.divergence_trace
            errs = [_plottable(t.get("rel_err")) for t in trace]
            ax.semilogy(range(len(errs)), errs, ".-", label=f"{c.impl} P={c.world_size} S={c.seq_len}")
            phases = [t.get("phase") for t in trace]
            if "backward" in phases:
                ax.axvline(phases.index("backward") - 0.5, color="grey", lw=0.8)
        ax.set_xlabel("value, in execution order (forward, then backward)")
        ax.set_ylabel("relative error against one device")
        ax.set_title("error of each op of a failing case")
        ax.legend(fontsize="small")
    fig.savefig(path, format="png", dpi=100)
    return path
