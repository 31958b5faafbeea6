"""One case end to end, each step one call in one direction:

model file -> (model_fn, inputs_fn) -> reference on one device -> simulator runs ``rank_fn`` on P
ranks (the impl prepares and steps inside each) -> per-rank results -> compare -> CaseResult.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import pickle
import tempfile

import torch

from autosp_verify.compare import check_structure, check_tensor, compare, structural_collectives, tolerance_for
from autosp_verify.core import (DTYPES, CaseSpec, LoadedCase, build_case, later_batches, lifted_recompile_limit,
                                model_functions, model_facts, rank_fn, reference)
from autosp_verify.deadline import DeadlineExceeded, deadline
from autosp_verify.impls import impl_label, resolve_impl
from autosp_verify.report import CaseResult
from autosp_verify.simulators import SimulationError, SimulatorUnavailable, get_simulator


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return dtype
    names = {v: k for k, v in DTYPES.items()}
    if dtype not in names:
        raise ValueError(f"unsupported dtype {dtype}; choose one of {', '.join(DTYPES)}")
    return names[dtype]


def _steps(steps) -> int:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return steps


def _payload(sim, spec, base, batch, later, folder):
    if sim.in_process:
        return LoadedCase(spec, base, batch, later)
    if not isinstance(spec.impl, str):
        raise ValueError(f"the {sim.name} simulator runs ranks in other processes: pass the impl as a "
                         "'MODULE:CALLABLE' or 'file.py:CALLABLE' string, not a callable")
    try:
        pickle.dumps(spec.model)
    except Exception:
        raise ValueError(f"the {sim.name} simulator needs a model file path or a model_fn defined at module "
                         "level (it is rebuilt in every rank's process)") from None
    path = os.path.join(folder, "weights.pt")
    torch.save({"state_dict": base.state_dict(), "batch": batch, "later": list(later)}, path)
    return dataclasses.replace(spec, weights_path=path)


def simulate(sim, spec, base, batch, timeout, later=()) -> list:
    """The ranks' results for this case on ``sim`` (raises what the simulator raises). ``later``:
    the batches the ranks step on after ``batch`` (reruns pass none)."""
    with tempfile.TemporaryDirectory(prefix="autosp-verify-") as folder, lifted_recompile_limit():
        return sim.run(spec.world_size, rank_fn, _payload(sim, spec, base, batch, later, folder), timeout)


def _silent(text: str) -> None:
    """Nobody asks what the case is doing."""


@dataclasses.dataclass
class Case:
    """One case as every stage sees it (run, compare, diagnose, account): what it is, where it
    runs, its model and batch, and its one-device reference. Stages ask it; nothing is handed down."""
    spec: CaseSpec
    sim: object
    base: torch.nn.Module
    batch: dict
    inputs_fn: object
    tol: object
    timeout: float
    ref: object = None
    later: tuple = ()
    phase: object = _silent  # phase(text): says what the case is doing (the progress line)

    def run(self, spec=None, batch=None, later=()) -> list:
        """The ranks' results for this case, or for ``spec``/``batch`` in its place (reruns)."""
        return simulate(self.sim, spec or self.spec, self.base, self.batch if batch is None else batch,
                        self.timeout, later)


def _diagnose(case: Case, failing=()):
    """Run a failing case again, recording every intermediate value (divergence.py), and find
    the first one that differs. Never raises: a diagnosis that cannot run says why."""
    from autosp_verify.divergence import locate
    spec = dataclasses.replace(case.spec, probes=("record",))  # alone: other probes must not watch a compiled reference
    try:
        with lifted_recompile_limit():  # the reference is compiled too (op level)
            ref = reference(case.base, case.batch, spec)
        ranks = case.run(spec)
        first, trace = locate(ref.probes["record"], [r["probes"]["record"] for r in ranks], case.tol, spec.seq_len)
    except Exception as exc:
        text = f"could not record intermediate values ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
        if "compile" in str(exc):
            text += ("; module hooks cannot record inside a model compiled whole: an impl built on autosp "
                     "can offer with_backend (see the impl protocol) to be recorded op by op")
        return {"message": text}, []
    if first is None:
        grads = [n for n in failing if n.startswith("grad ")]
        if grads and len(grads) == len(failing):
            first = {"message": f"every recorded value and activation gradient matches; only parameter gradients "
                                f"differ ({', '.join(grads[:3])}{', ...' if len(grads) > 3 else ''}): how the impl "
                                "reduces or scales parameter gradients over the ranks (a missing, extra or doubled "
                                "all-reduce), not the forward"}
        else:
            first = {"message": "every recorded intermediate value and gradient matches; the difference is in what "
                                "the impl does after the model (loss, outputs) or outside what was recorded"}
    return first, trace


def _reference_changed(case: Case) -> str | None:
    """Why the one-device reference is no longer what it was before the impl ran, or None.

    An impl runs in this process (threaded, fake) or is imported here to be checked: one that
    patches torch or the model's classes at import or while preparing (as SP libraries that
    register attention functions do) would change the reference too, and be compared with itself.
    So the reference is computed first and computed again after the ranks ran."""
    again, ref = reference(case.base, case.batch, dataclasses.replace(case.spec, probes=())), case.ref
    checks = [check_tensor("loss", again.loss, ref.loss, case.tol)]
    checks += [check_tensor(f"grad {n}", again.grads[n], g, case.tol) for n, g in ref.grads.items()]
    changed = [c for c in checks if not c.passed]
    if not changed:
        return None
    return (f"the impl changed the one-device model: the reference computed again after the impl ran differs "
            f"({changed[0].describe()}; {len(changed)} of {len(checks)} tensors). Something the impl imports "
            "or runs patches torch or the model's classes for every model in the process (e.g. registers an "
            "attention function); the verdict would compare the impl with itself")


@contextlib.contextmanager
def process_state_restored():
    """What a case may change for the whole process, as it was before: ``sys.excepthook`` (every
    threaded rank's ``init_process_group`` wraps it with a rank prefix and nothing unwraps it),
    the default dtype, and Dynamo's config (impls set options)."""
    hook, dtype = sys.excepthook, torch.get_default_dtype()
    dynamo = torch._dynamo.config.get_config_copy()
    try:
        yield
    finally:
        sys.excepthook = hook
        torch.set_default_dtype(dtype)
        now = torch._dynamo.config.get_config_copy()  # (getattr warns on deprecated keys)
        for key, value in dynamo.items():
            if now.get(key) != value:
                setattr(torch._dynamo.config, key, value)


def run_case(spec: CaseSpec, inputs_fn, simulator: str = "threaded", timeout: float = 120.0,
             rtol: float | None = None, atol: float | None = None, diagnose: bool = True,
             accounting: bool = True, memory: bool = False, compile_time: bool = False,
             phase=None) -> CaseResult:
    """Run one case (see ``_run_case``); the process's global state is restored after it.
    ``phase(text)``, when given, is told what the case is doing as it goes."""
    with process_state_restored():
        try:
            return _run_case(spec, inputs_fn, simulator, timeout, rtol, atol, diagnose, accounting, memory,
                             compile_time, phase)
        except DeadlineExceeded as exc:  # the reference or a warm-up on this thread
            return CaseResult(impl_label(spec.impl), simulator, spec.world_size, spec.seq_len, spec.batch,
                              _dtype_name(spec.dtype), status="error", error=str(exc))


def _run_case(spec, inputs_fn, simulator, timeout, rtol, atol, diagnose, accounting, memory,
              compile_time, phase=None) -> CaseResult:
    """Run one case. Raises ModelFileError / ImplUnavailable / ValueError for unusable input.
    A failing case is run once more to find its first divergence (``diagnose``). ``accounting``:
    collectives against the Ulysses minimum; ``memory``: also activation memory per rank (runs
    the case once more, see accounting.py); ``compile_time``: also compile with and without the passes."""
    for name in ("world_size", "seq_len", "batch"):
        if not isinstance(getattr(spec, name), int) or getattr(spec, name) < 1:
            raise ValueError(f"{name} must be a positive integer, got {getattr(spec, name)!r}")
    sim = get_simulator(simulator)
    tol = tolerance_for(DTYPES[spec.dtype], rtol, atol)
    if accounting and "accounting" not in spec.probes:
        spec = dataclasses.replace(spec, probes=(*spec.probes, "accounting"))
    if sim.structural:  # no numbers to compare: one step shows the structure
        spec = dataclasses.replace(spec, steps=1)
    model_fn, file_inputs_fn = model_functions(spec.model)
    inputs_fn = inputs_fn or file_inputs_fn
    base, batch = build_case(model_fn, inputs_fn, spec)
    case = Case(spec, sim, base, batch, inputs_fn, tol, timeout, later=tuple(later_batches(inputs_fn, spec)),
                phase=phase or _silent)
    case.phase("the one-device reference")
    with deadline(timeout, "the one-device reference (on this thread, before the ranks)"):
        case.ref = reference(base, batch, spec)  # before this case imports or prepares any impl code
        later_refs = [reference(base, b, dataclasses.replace(spec, probes=())) for b in case.later]
        computes = model_facts(base, batch, spec)
    resolve_impl(spec.impl)  # an unknown or unavailable impl is a usage error, found before any run
    result = CaseResult(impl_label(spec.impl), sim.name, spec.world_size, spec.seq_len, spec.batch, spec.dtype,
                        status="error", structural=sim.structural)
    case.phase(f"compiling and running {spec.world_size} ranks ({sim.name})")
    try:
        ranks = case.run(later=case.later)
    except SimulationError as exc:
        result.status = "unsupported" if exc.failure.kind == "unsupported" else "error"
        result.error = exc.failure.message
        return result
    except SimulatorUnavailable as exc:
        result.status, result.error = "skipped", str(exc)
        return result
    with deadline(timeout, "the one-device reference, computed again after the ranks"):
        tampered = _reference_changed(case)
    if tampered:
        result.error = tampered
        return result
    if accounting:
        from autosp_verify.accounting import account_case
        case.phase("accounting" + (": the ranks again at S+P" if memory else ""))
        result.accounting = account_case(case, ranks, memory=memory, compile_time=compile_time)
    if sim.structural:
        result.failures = check_structure(case.ref, ranks)
        result.structural_collectives = structural_collectives(ranks)
        result.status = "fail" if result.failures else "structural"
        return result
    case.phase("comparing with one device")
    cmp = _record_comparison(result, case.ref, later_refs, ranks, tol, computes.computes_in)
    result.coarser = {c.name: c.coarser for c in cmp.checks if c.coarser}
    if result.coarser:
        result.computes_in = {"dtype": str(computes.computes_in).removeprefix("torch."), "where": computes.where}
    if not cmp.passed and diagnose:
        case.phase("locating the first divergence (run again, recording)")
        failing = [c.name for c in cmp.checks if not c.passed]
        result.first_divergence, result.divergence_trace = _diagnose(case, failing)
    return result


def _record_comparison(result, ref, later_refs, ranks, tol, computes_in):
    """Step 1 against its reference (the numbers the table shows), then every later step (its
    failures, prefixed with the step); returns step 1's comparison."""
    cmp = compare(ref, ranks, tol, computes_in, result.batch)
    worst, grad = cmp.worst, cmp.worst_grad
    result.status = "pass" if cmp.passed else "fail"
    result.loss_abs_err = cmp.loss.abs_err
    result.max_grad_rel_err = cmp.max_grad_rel_err
    result.worst_tensor = {"name": worst.name, "abs_err": worst.abs_err, "rel_err": worst.rel_err}
    result.worst_grad = None if grad is None else {"name": grad.name.removeprefix("grad "), "rel_err": grad.rel_err}
    result.failures = cmp.failures()
    result.tensors = [{"name": c.name, "abs_err": c.abs_err, "rel_err": c.rel_err, "passed": c.passed}
                      for c in cmp.checks]
    for number, later_ref in enumerate(later_refs, 2):
        step_cmp = compare(later_ref, [r["later"][number - 2] for r in ranks], tol, computes_in, result.batch)
        if not step_cmp.passed:
            result.status = "fail"
            result.failures += [f"step {number} (other inputs, the same prepared step): {f}"
                                for f in step_cmp.failures()]
    return cmp


def verify(model_fn, inputs_fn, *, impl="autosp", world_size=2, seq_len=16, batch=2, dtype=torch.float64,
           simulator="threaded", seed=0, timeout=120.0, rtol=None, atol=None, steps=2) -> CaseResult:
    """Check that ``impl`` makes ``model_fn``'s model sequence-parallel exactly. ``impl`` is a name,
    'MODULE:CALLABLE', or (in-process simulators only) a callable following the impl protocol.
    ``steps``: batches the prepared step runs on (each another draw of ``inputs_fn``), each compared."""
    spec = CaseSpec(model_fn, impl, world_size, seq_len, batch, _dtype_name(dtype), seed, steps=_steps(steps))
    return run_case(spec, inputs_fn, simulator, timeout, rtol, atol)


def verify_file(path, **kwargs) -> CaseResult:
    """:func:`verify` for a model file (a .py defining model_fn and inputs_fn)."""
    kw = {"impl": "autosp", "world_size": 2, "seq_len": 16, "batch": 2, "dtype": torch.float64, "seed": 0,
          "steps": 2, **kwargs}
    spec = CaseSpec(os.path.abspath(path), kw.pop("impl"), kw.pop("world_size"), kw.pop("seq_len"), kw.pop("batch"),
                    _dtype_name(kw.pop("dtype")), kw.pop("seed"), steps=_steps(kw.pop("steps")))
    return run_case(spec, None, **kw)
