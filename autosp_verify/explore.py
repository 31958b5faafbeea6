"""``autosp-verify MODEL.py --explore N``: search the case space for a failure, shrink it, print
the command that reproduces it.

Hypothesis draws N cases (world size P, sequence length S, batch B, dtype), runs each like the
plain command does, and when one fails shrinks it to the smallest case that still fails:
smallest P first, then smallest S, then smallest B (then the first dtype listed). Hypothesis
tries the smallest case of all first, so a failure at the smallest corner is found at once.

What fails: a case whose status is ``fail`` (a mismatch) or ``error`` (the impl crashed or hung
on a case it accepted). ``unsupported`` is NOT a failure: a refusal is not a wrong number, and
an impl that refuses lengths P does not divide is allowed to; refusals are counted and said so.
A case the model itself cannot run on one device (e.g. a length past its position table) is
neither: it is counted and the first message shown.

The search space: P from the world sizes given (default 2 and 4); S from 1 (or the smallest of
several lengths given) up to the largest length given (default 64), so lengths below P and
lengths P does not divide are drawn as well; B from 1 up to the batch given (default 4); dtype
from ``--explore-dtypes`` (default: the ``--dtype`` given, float64). The search is seeded with
``--seed`` (which also seeds the weights and inputs, as in the plain command), so the same
command finds the same minimal case.

Exit status: 1 a failure was found; otherwise 0 when some case passed, 3 when every case was
refused, 4 when nothing could be checked here, 2 for bad usage (as the plain command).
"""
from __future__ import annotations

import inspect
import json
import shlex
import sys
from dataclasses import dataclass, field

from hypothesis import HealthCheck, Phase, Verbosity, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.reporting import with_reporter

from autosp_verify.core import DTYPES, CaseSpec, model_functions
from autosp_verify.impls import ImplUnavailable, impl_label, resolve_impl
from autosp_verify.model_file import ModelFileError
from autosp_verify.report import EXIT, EXIT_USAGE, CaseResult, format_table, to_json
from autosp_verify.run import run_case

DEFAULT_WORLD_SIZES = (2, 4)
DEFAULT_MAX_SEQ_LEN = 64
DEFAULT_MAX_BATCH = 4
FAILING = ("fail", "error")
MODEL_CANNOT = "model-invalid"  # the status counted for a case the model itself cannot run on one device

# While searching, skip the extras a failing case would otherwise pay for (a second run to find
# the first divergence, collective accounting); the minimal case is run once more with them.
_SEARCH_ONLY = {k: False for k in ("diagnose", "accounting") if k in inspect.signature(run_case).parameters}


class _Found(Exception):
    def __init__(self, result: CaseResult):
        super().__init__(f"{result.status}: P={result.world_size} S={result.seq_len} B={result.batch}")
        self.result = result


@dataclass
class ExploreResult:
    model: str
    impl: str
    simulator: str
    seed: int
    world_sizes: tuple
    seq_lens: tuple  # (lowest, highest) drawn
    max_batch: int
    dtypes: tuple
    examples: int = 0  # cases Hypothesis asked for, generating and shrinking (repeats run once)
    statuses: dict = field(default_factory=dict)  # (P, S, B, dtype) -> status, every distinct case run
    failure: CaseResult | None = None  # the minimal failing case
    first_failure: tuple | None = None  # (P, S, B, dtype) of the first failing case found, before shrinking
    model_error: str | None = None  # the first case the model itself could not run, and why
    extra_args: tuple = ()  # --timeout / --rtol / --atol as given, for the reproduce command

    @property
    def counts(self) -> dict:
        counts = {}
        for status in self.statuses.values():
            counts[status] = counts.get(status, 0) + 1
        return counts

    @property
    def verdict(self) -> str:
        if self.failure is not None:
            return self.failure.status
        counts = self.counts
        return next((s for s in ("pass", "structural", "unsupported", "skipped") if counts.get(s)), MODEL_CANNOT)

    @property
    def exit_status(self) -> int:
        return EXIT.get(self.verdict, EXIT_USAGE)

    def reproduce_argv(self) -> list | None:
        if self.failure is None:
            return None
        f = self.failure
        return ["autosp-verify", self.model, "--impl", self.impl, "--world-size", str(f.world_size),
                "--seq-len", str(f.seq_len), "--batch", str(f.batch), "--dtype", f.dtype,
                "--simulator", self.simulator, "--seed", str(self.seed), *self.extra_args]

    def reproduce(self) -> str | None:
        argv = self.reproduce_argv()
        return None if argv is None else shlex.join(argv)

    def space(self) -> str:
        lo, hi = self.seq_lens
        sizes = ", ".join(map(str, self.world_sizes))
        return f"P in {{{sizes}}}, S in {lo}..{hi}, B in 1..{self.max_batch}, dtype {' or '.join(self.dtypes)}"

    def to_dict(self) -> dict:
        report = json.loads(to_json([self.failure] if self.failure else []))
        report["verdict"] = self.verdict
        report["explore"] = {
            "model": self.model, "impl": self.impl, "simulator": self.simulator, "seed": self.seed,
            "space": {"world_sizes": list(self.world_sizes), "seq_len": list(self.seq_lens),
                      "batch": [1, self.max_batch], "dtypes": list(self.dtypes)},
            "examples": self.examples, "cases_run": len(self.statuses), "counts": self.counts,
            "unsupported_is_failure": False,
            "minimal": None if self.failure is None else {
                "world_size": self.failure.world_size, "seq_len": self.failure.seq_len,
                "batch": self.failure.batch, "dtype": self.failure.dtype, "status": self.failure.status},
            "first_failure": None if self.first_failure is None else dict(
                zip(("world_size", "seq_len", "batch", "dtype"), self.first_failure)),
            "reproduce": self.reproduce(), "model_error": self.model_error,
        }
        return report


def _positive(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_bounds(n_examples, world_sizes, min_seq_len, max_seq_len, max_batch, dtypes) -> None:
    _positive("the number of examples", n_examples)
    for name, value in (("max_seq_len", max_seq_len), ("min_seq_len", min_seq_len), ("max_batch", max_batch),
                        *(("world size", p) for p in world_sizes)):
        _positive(name, value)
    if min_seq_len > max_seq_len:
        raise ValueError(f"min_seq_len {min_seq_len} is above max_seq_len {max_seq_len}")
    if not world_sizes or not dtypes:
        raise ValueError("explore needs at least one world size and one dtype")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")


def _case_runner(model, impl, seed, simulator, timeout, rtol, atol, result, progress):
    """``run((P, S, B, dtype))``: the case's CaseResult (None when the model cannot run that size
    on one device), each case run once however often the search draws it."""
    cache = {}

    def run(key):
        if key not in cache:
            p, s, b, dtype = key
            try:
                cache[key] = run_case(CaseSpec(model, impl, p, s, b, dtype, seed), None, simulator, timeout, rtol,
                                      atol, **_SEARCH_ONLY)
                result.statuses[key] = cache[key].status
                if cache[key].status in FAILING and result.first_failure is None:
                    result.first_failure = key
            except ModelFileError as exc:  # the model cannot run this size on one device
                cache[key] = None
                result.statuses[key] = MODEL_CANNOT
                result.model_error = result.model_error or f"P={p} S={s} B={b} {dtype}: {exc}"
            if progress is not None:
                progress(result)
        return cache[key]
    return run


def explore(model, impl, n_examples: int, *, world_sizes=DEFAULT_WORLD_SIZES, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
            min_seq_len: int = 1, max_batch: int = DEFAULT_MAX_BATCH, dtypes=("float64",),
            simulator: str = "threaded", seed: int = 0, timeout: float = 120.0, rtol: float | None = None,
            atol: float | None = None, progress=None, diagnose_minimal: bool = True) -> ExploreResult:
    """Search up to ``n_examples`` cases for one that fails; shrink it. ``model``: a model file path
    (as it should appear in the reproduce command); ``progress(result)``: called after each new case;
    ``diagnose_minimal``: run the minimal failing case once more with what the search leaves out
    (first divergence, collective accounting). Raises ModelFileError / ImplUnavailable / ValueError
    for unusable input, before any case runs."""
    _check_bounds(n_examples, world_sizes, min_seq_len, max_seq_len, max_batch, dtypes)
    resolve_impl(impl)  # unusable impl or model file: a usage error now, not a "failure" to shrink
    model_functions(model)
    extra = ["--timeout", repr(timeout)] if timeout != 120.0 else []
    extra += [arg for flag, v in (("--rtol", rtol), ("--atol", atol)) if v is not None for arg in (flag, repr(v))]
    result = ExploreResult(model=model, impl=impl_label(impl), simulator=simulator, seed=seed,
                           world_sizes=tuple(sorted(set(world_sizes))),
                           seq_lens=(min_seq_len, max_seq_len), max_batch=max_batch,
                           dtypes=tuple(dict.fromkeys(dtypes)), extra_args=tuple(extra))
    run, aborted = _case_runner(model, impl, seed, simulator, timeout, rtol, atol, result, progress), []

    # Draw order is shrink priority: P, then S, then B, then dtype; each shrinks toward its first value.
    @settings(max_examples=n_examples, database=None, deadline=None, derandomize=False, print_blob=False,
              phases=(Phase.generate, Phase.shrink), report_multiple_bugs=False, verbosity=Verbosity.quiet,
              suppress_health_check=list(HealthCheck))
    @hypothesis_seed(seed)
    @given(st.sampled_from(result.world_sizes), st.integers(min_seq_len, max_seq_len), st.integers(1, max_batch),
           st.sampled_from(result.dtypes))
    def search(world_size, seq_len, batch, dtype):
        result.examples += 1
        if aborted:  # a usage error met mid-search: fail fast until Hypothesis gives up, then raise it
            raise aborted[0]
        try:
            case = run((world_size, seq_len, batch, dtype))
        except (ImplUnavailable, ValueError) as exc:
            aborted.append(exc)
            raise
        if case is not None and case.status in FAILING:
            raise _Found(case)

    with with_reporter(lambda *_: None):
        try:
            search()
        except _Found as found:
            result.failure = found.result
        except Exception:
            if not aborted:
                raise
    if aborted:
        raise aborted[0]
    if result.failure is not None and _SEARCH_ONLY and diagnose_minimal:  # once more, with every extra
        f = result.failure
        full = run_case(CaseSpec(model, impl, f.world_size, f.seq_len, f.batch, f.dtype, seed), None, simulator,
                        timeout, rtol, atol)
        if full.status in FAILING:
            result.failure = full
    return result


def _reporter(stream, quiet: bool):
    """``progress(result)`` for the CLI: a line per case tried, as it is tried (rich on a terminal,
    plain lines in a log), saying whether the search is still looking or shrinking a failure."""
    if quiet:
        return None
    console = None
    if stream.isatty():
        from rich.console import Console
        console = Console(file=stream, highlight=False)

    def report(result: ExploreResult):
        (p, s, b, dtype), status = list(result.statuses.items())[-1]
        phase = "searching" if result.first_failure in (None, (p, s, b, dtype)) else "shrinking"
        counts = ", ".join(f"{n} {k}" for k, n in sorted(result.counts.items()))
        line = (f"explore case {len(result.statuses)}: P={p} S={s} B={b} {dtype}: {status.upper()} "
                f"({phase}; so far {counts})")
        if console is not None:
            console.print(line)
        else:
            print(line, file=stream, flush=True)
    return report


def format_result(result: ExploreResult) -> str:
    counts = result.counts
    parts = ", ".join(f"{counts[s]} {s}" for s in ("pass", "structural", "fail", "error", "unsupported", "skipped",
                                                   MODEL_CANNOT) if counts.get(s))
    lines = [f"explore: {result.examples} examples, {len(result.statuses)} distinct cases run ({parts})"]
    if counts.get("unsupported"):
        lines.append(f"  {counts['unsupported']} unsupported: the impl refused them; a refusal is not a failure")
    if result.model_error:
        lines.append(f"  {counts[MODEL_CANNOT]} {MODEL_CANNOT}: the model itself cannot run them on one device (not "
                     f"a failure), e.g. {result.model_error}")
    if result.failure is None:
        lines.append(f"no failure in {len(result.statuses)} cases ({result.space()})")
        if result.verdict == "structural":
            lines.append("structural only: the fake simulator checks shapes, never numbers")
        elif result.verdict != "pass":
            lines.append(f"nothing passed: verdict {result.verdict}")
        return "\n".join(lines)
    f = result.failure
    found = result.first_failure
    if found == (f.world_size, f.seq_len, f.batch, f.dtype):
        how = "the first failing case found"
    else:
        failing = sum(s in FAILING for s in result.statuses.values())
        how = f"shrunk from P={found[0]}, S={found[1]}, B={found[2]}, {found[3]}; {failing} failing cases seen"
    lines.append(f"minimal failing case: P={f.world_size}, S={f.seq_len}, B={f.batch}, {f.dtype} ({how})")
    lines.append(format_table([f]))
    lines.append(f"reproduce: {result.reproduce()}")
    return "\n".join(lines)


def run_explore(config, out=None) -> int:
    """The CLI's --explore: bounds from the options given on the command line (``config.explicit``)."""
    out = out or sys.stdout
    given_opts = getattr(config, "explicit", frozenset())
    seq_lens = config.seq_lens if "seq_len" in given_opts else (DEFAULT_MAX_SEQ_LEN,)
    try:
        result = explore(
            config.model, config.impl, config.explore,
            world_sizes=config.world_sizes if "world_size" in given_opts else DEFAULT_WORLD_SIZES,
            max_seq_len=max(seq_lens), min_seq_len=min(seq_lens) if len(seq_lens) > 1 else 1,
            max_batch=config.batch if "batch" in given_opts else DEFAULT_MAX_BATCH,
            dtypes=config.explore_dtypes or (config.dtype,), simulator=config.simulator, seed=config.seed,
            timeout=config.timeout, rtol=config.rtol, atol=config.atol,
            progress=_reporter(sys.stderr, getattr(config, "quiet", False)))
    except (ModelFileError, ImplUnavailable, ValueError) as exc:
        print(f"autosp-verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(format_result(result), file=out)
    if result.verdict == MODEL_CANNOT:
        print(f"autosp-verify: the model fails on one device in every case tried: {result.model_error}",
              file=sys.stderr)
    if config.json:
        with open(config.json, "w") as f:
            f.write(json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return result.exit_status
