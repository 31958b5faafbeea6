"""Compare per-rank results with the single-device reference. The only place tolerances live.

Metric, per tensor, computed in float64 over the finite entries::

    abs_err = max |impl - ref|
    rel_err = abs_err / max |ref|     (0 when both are exactly zero; inf when ref is all zero and impl not)
    passes  iff  abs_err <= atol + rtol * max |ref|

NaN/Inf in the impl where the reference is finite is a failure named as such, with the tensor,
the count and, for the loss and gradients, the rank (abs/rel err are NaN then: no number hides
it). A reference whose loss or gradients are not finite never gets here: the model fails on one
device (``core.reference``, exit 2); non-finite reference outputs must match position by
position (NaN where NaN, the same infinities). ``rtol`` is set by
the dtype the case runs in, or by the compared tensor's own dtype when that is coarser: a model
that computes its loss in float32 inside a float64 run (HF upcasts logits with ``.float()``)
produces a float32 loss, which carries float32 precision whatever the case dtype; ``atol`` is tiny (about 1000 ulp of 1.0 in float64, 1 ulp-ish in
the others) and only matters for tensors whose reference is all (near) zero, e.g. the gradient
of a parameter that does not reach the loss. The CLI may override both (``--rtol``,
``--atol``); tests never loosen them.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Tolerance:
    rtol: float
    atol: float
    explicit: bool = False  # given on the command line: applies to every tensor as it is


TOLERANCES = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-13),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-7),
    torch.bfloat16: Tolerance(rtol=1e-2, atol=1e-4),
    torch.float16: Tolerance(rtol=1e-3, atol=1e-5),
}


def tolerance_for(dtype: torch.dtype, rtol: float | None = None, atol: float | None = None) -> Tolerance:
    if dtype not in TOLERANCES:
        raise ValueError(f"no tolerance for dtype {dtype}; choose one of {', '.join(map(str, TOLERANCES))}")
    base = TOLERANCES[dtype]
    return Tolerance(base.rtol if rtol is None else rtol, base.atol if atol is None else atol,
                     explicit=rtol is not None or atol is not None)


def _for_tensor(tol: Tolerance, dtype: torch.dtype) -> Tolerance:
    """The tolerance for a tensor of ``dtype``: its own table entry when coarser than the case's."""
    own = TOLERANCES.get(dtype)
    if tol.explicit or own is None or own.rtol <= tol.rtol:
        return tol
    return own


@dataclass
class TensorCheck:
    name: str
    abs_err: float = math.inf
    rel_err: float = math.inf
    passed: bool = False
    problem: str = ""  # a failure that is not (only) a number: shape, NaN, missing, ranks disagree
    score: float = math.inf  # abs_err / allowed error: > 1 fails; ranks the worst tensor
    coarser: str = ""  # passed only at this dtype's tolerance, the one the model computes in (precision.py)

    def describe(self) -> str:
        text = f"{self.name}: abs err {self.abs_err:.3g}, rel err {self.rel_err:.3g}"
        return f"{text} ({self.problem})" if self.problem else text


def non_finite(t: torch.Tensor) -> str:
    """'NaN', 'Inf', 'NaN and Inf' (what ``t`` holds that is not finite), or '' when all finite."""
    kinds = [k for k, present in (("NaN", torch.isnan(t).any()), ("Inf", torch.isinf(t).any())) if present]
    return " and ".join(kinds)


def check_tensor(name: str, impl: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> TensorCheck:
    tol = _for_tensor(tol, ref.dtype)
    if tuple(impl.shape) != tuple(ref.shape):
        return TensorCheck(name, problem=f"shape {tuple(impl.shape)}, reference {tuple(ref.shape)}")
    i, r = impl.detach().cpu().double(), ref.detach().cpu().double()
    fi, fr = torch.isfinite(i), torch.isfinite(r)
    problem = ""
    if (fr & ~fi).any():
        bad = fr & ~fi
        problem = (f"NaN/Inf where the reference is finite: {non_finite(i[bad])} in {int(bad.sum())} of "
                   f"{bad.numel()} entries")
    elif (~fr).any() and not torch.equal(i[~fr].nan_to_num(nan=0.5), r[~fr].nan_to_num(nan=0.5)):
        problem = "non-finite values differ from the reference"
    both = fi & fr
    abs_err = (i[both] - r[both]).abs().max().item() if both.any() else 0.0
    max_ref = r[fr].abs().max().item() if fr.any() else 0.0
    rel_err = 0.0 if abs_err == 0 else (abs_err / max_ref if max_ref > 0 else math.inf)
    if problem:  # the finite entries may agree; the error is not a number then
        abs_err = rel_err = math.nan
    allowed = tol.atol + tol.rtol * max_ref
    score = math.inf if problem else (abs_err / allowed if allowed > 0 else (0.0 if abs_err == 0 else math.inf))
    return TensorCheck(name, abs_err, rel_err, not problem and abs_err <= allowed, problem, score)


def _worst(checks: list[TensorCheck], name: str, problem: str = "") -> TensorCheck:
    worst = max(checks, key=lambda c: c.score)
    problem = problem or worst.problem
    return TensorCheck(name, worst.abs_err, worst.rel_err, worst.passed and not problem, problem,
                       math.inf if problem else worst.score)


def check_loss(ref: torch.Tensor, rank_losses: dict, tol: Tolerance) -> TensorCheck:
    """Every rank's loss against the reference; ranks that disagree with each other are named."""
    bad = {r: tuple(loss.shape) for r, loss in rank_losses.items() if loss.numel() != 1}
    if bad:
        return TensorCheck("loss", problem=f"not a scalar on rank(s) {bad}")
    checks = [check_tensor(f"loss (rank {r})", loss.reshape(()), ref.reshape(()), tol) for r, loss in rank_losses.items()]
    values = {r: loss.double().item() for r, loss in rank_losses.items()}
    bad = {r: non_finite(torch.tensor(v)) for r, v in values.items() if not math.isfinite(v)}
    finite = [v for v in values.values() if math.isfinite(v)]
    spread = max(finite) - min(finite) if finite else 0.0  # max/min with a NaN depend on the order
    problem = ""
    own = _for_tensor(tol, ref.dtype)  # the same tolerance the per-rank checks use
    if bad and math.isfinite(ref.double().item()):
        where = ", ".join(f"{kind} on rank {r}" for r, kind in bad.items())
        problem = f"NaN/Inf where the reference is finite: {where}"
    elif spread > own.atol + own.rtol * abs(ref.double().item()):
        problem = "loss differs across ranks: " + ", ".join(f"rank {r} {v:.10g}" for r, v in values.items())
    return _worst(checks, "loss", problem)


def check_output(name: str, ref: torch.Tensor, per_rank: dict, tol: Tolerance, batch: int = 1) -> TensorCheck:
    """Replicated (every rank has the reference shape) or sharded along the one dim that differs:
    the ranks' parts in rank order, or, where that differs from the reference, as ``batch`` rows
    of each rank's positions flattened together (``[B * S, E]``: HF's MoE router logits)."""
    missing = [r for r, t in per_rank.items() if t is None]
    if missing:
        return TensorCheck(name, problem=f"missing on rank(s) {missing}")
    if all(tuple(t.shape) == tuple(ref.shape) for t in per_rank.values()):
        return _worst([check_tensor(name, t, ref, tol) for t in per_rank.values()], name)
    dims = set()
    for r, t in per_rank.items():
        if t.dim() != ref.dim():
            return TensorCheck(name, problem=f"rank {r} has shape {tuple(t.shape)}, reference {tuple(ref.shape)}")
        dims.update(d for d in range(t.dim()) if t.shape[d] != ref.shape[d])
    if len(dims) != 1:
        shapes = ", ".join(f"rank {r} {tuple(t.shape)}" for r, t in per_rank.items())
        return TensorCheck(name, problem=f"shapes differ from the reference {tuple(ref.shape)} in more than one "
                                         f"dim ({shapes})")
    dim = dims.pop()
    whole = torch.cat([t.detach().cpu() for t in per_rank.values()], dim=dim)
    if tuple(whole.shape) != tuple(ref.shape):
        return TensorCheck(name, problem=f"shards along dim {dim} concatenate to {tuple(whole.shape)}, "
                                         f"reference {tuple(ref.shape)}")
    check = check_tensor(name, whole, ref, tol)
    if check.passed or check.problem or batch < 2 or any(t.shape[dim] % batch for t in per_rank.values()):
        return check
    rows = [t.detach().cpu().unflatten(dim, (batch, -1)) for t in per_rank.values()]
    batch_major = check_tensor(name, torch.cat(rows, dim + 1).flatten(dim, dim + 1), ref, tol)
    return batch_major if batch_major.passed else check


def check_grad(name: str, ref: torch.Tensor, per_rank: dict, tol: Tolerance) -> TensorCheck:
    """The SP convention: the gradients of the SP group are summed, then compared."""
    missing = [r for r, g in per_rank.items() if g is None]
    if missing:
        return TensorCheck(f"grad {name}", problem=f"missing on rank(s) {missing}")
    bad = [r for r, g in per_rank.items() if tuple(g.shape) != tuple(ref.shape)]
    if bad:
        return TensorCheck(f"grad {name}", problem=f"shape {tuple(per_rank[bad[0]].shape)} on rank {bad[0]}, "
                                                   f"reference {tuple(ref.shape)}")
    total = sum(g.detach().cpu().double() for g in per_rank.values())
    check = check_tensor(f"grad {name}", total, ref, tol)
    bad = [r for r, g in per_rank.items() if not torch.isfinite(g).all()]
    if check.problem and bad:  # the sum hides whose it was
        check.problem += f", from rank{'s' * (len(bad) > 1)} {', '.join(map(str, bad))}"
    return check


@dataclass
class Comparison:
    loss: TensorCheck
    outputs: list = field(default_factory=list)
    grads: list = field(default_factory=list)

    @property
    def checks(self) -> list:
        return [self.loss, *self.outputs, *self.grads]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def worst(self) -> TensorCheck:
        return max(self.checks, key=lambda c: c.score)

    @property
    def max_grad_rel_err(self) -> float:
        errors = [c.rel_err for c in self.grads]
        return math.nan if any(math.isnan(e) for e in errors) else max(errors, default=0.0)  # NaN never hides

    @property
    def worst_grad(self) -> TensorCheck | None:
        """The gradient nearest to (or furthest past) its allowed error: ranked by the tolerance ratio,
        not the relative error, which is meaningless for a gradient that is zero on one device (e.g.
        a key bias: softmax ignores it) and passes on the absolute tolerance."""
        return max(self.grads, key=lambda c: c.score, default=None)

    def failures(self) -> list:
        """The failing checks, worst first."""
        failing = sorted((c for c in self.checks if not c.passed), key=lambda c: -c.score)
        return [c.describe() for c in failing]


def compare(ref, ranks: list, tol: Tolerance, computes_in: torch.dtype | None = None, batch: int = 1) -> Comparison:
    """``ref``: a Reference (loss, outputs, grads); ``ranks``: each rank's result dict, in rank order;
    ``computes_in``: a dtype coarser than the case's that the model computes in (precision.py): a
    tensor failing the case's tolerance by its numbers alone is held to that dtype's instead (and
    marked ``coarser``); ``batch``: the case's, for outputs that flatten it with the sequence."""
    by_rank = dict(enumerate(ranks))
    coarse = None if computes_in is None or tol.explicit else _for_tensor(tol, computes_in)

    def checked(check, *args):
        result = check(*args, tol)
        if result.passed or result.problem or coarse is None or coarse == tol:
            return result
        again = check(*args, coarse)
        again.coarser = str(computes_in).removeprefix("torch.") if again.passed else ""
        return again if again.passed else result
    loss = checked(check_loss, ref.loss, {r: res["loss"] for r, res in by_rank.items()})
    outputs = [checked(functools.partial(check_output, batch=batch), n, t,
                       {r: res["outputs"].get(n) for r, res in by_rank.items()})
               for n, t in ref.outputs.items()]
    grads = [checked(check_grad, n, g, {r: res["grads"].get(n) for r, res in by_rank.items()})
             for n, g in ref.grads.items()]
    return Comparison(loss, outputs, grads)


def structural_collectives(ranks: list) -> dict | None:
    """The collectives each rank run issued through autosp's ops (fake simulator, see
    simulators/fake.py), as ``{"RANK": {kind: count, kind_bytes: bytes}}``; None when nothing was
    counted on any rank (autosp not loaded, or an impl that does not use autosp's ops)."""
    counted = {str(r): dict(sorted((res.get("structural_collectives") or {}).items()))
               for r, res in enumerate(ranks) if res is not None}
    return counted if any(counted.values()) else None


def describe_collectives(counts: dict) -> str:
    """``all_reduce 1 (8 B), all_to_all 16 (65536 B)``: count by kind, bytes handed to each kind."""
    kinds = sorted(k for k in counts if not k.endswith("_bytes"))
    return ", ".join(f"{k} {counts[k]} ({counts.get(k + '_bytes', 0)} B)" for k in kinds) or "none"


def check_structure(ref, ranks: list) -> list:
    """For the fake simulator: shapes, and the same collectives on every rank run (values are
    meaningless). Returns the problems found."""
    problems = []
    counted = structural_collectives(ranks)
    if counted and len({tuple(c.items()) for c in counted.values()}) > 1:
        problems.append("ranks issue different collectives (autosp's ops, forward and backward): "
                        + "; ".join(f"rank {r}: {describe_collectives(c)}" for r, c in counted.items()))
    for r, res in enumerate(ranks):
        if res is None:
            continue
        if res["loss"].numel() != 1:
            problems.append(f"rank {r}: loss has shape {tuple(res['loss'].shape)}, expected a scalar")
        for n, t in ref.outputs.items():
            got = res["outputs"].get(n)
            diff = None if got is None or got.dim() != t.dim() else [d for d in range(t.dim()) if got.shape[d] != t.shape[d]]
            if diff is None or len(diff) > 1 or (diff and got.shape[diff[0]] > t.shape[diff[0]]):
                shape = None if got is None else tuple(got.shape)
                problems.append(f"rank {r}: output {n} has shape {shape}, reference {tuple(t.shape)} (neither "
                                "replicated nor a shard along one dim)")
        for n, g in ref.grads.items():
            got = res["grads"].get(n)
            if got is None or tuple(got.shape) != tuple(g.shape):
                problems.append(f"rank {r}: grad {n} has shape {None if got is None else tuple(got.shape)}, "
                                f"parameter {tuple(g.shape)}")
    return problems
