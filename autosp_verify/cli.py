"""``autosp-verify MODEL.py``: one case per (world size, sequence length), a table, a verdict.

Exit status: 0 every case equivalent (or structurally sound, with --simulator fake); 1 a mismatch,
an impl crash or a timeout; 2 bad usage, an unloadable model file, or a model failing on one
device; 3 the impl refused the model (every non-passing case unsupported); 4 nothing could be
checked here (e.g. --simulator nccl without enough GPUs).

``--explore N`` searches N cases for a failure instead and shrinks it (see explore.py).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

from autosp_verify.core import DTYPES, CaseSpec
from autosp_verify.impls import ImplUnavailable
from autosp_verify.model_file import ModelFileError
from autosp_verify.progress import Progress
from autosp_verify.report import EXIT_USAGE, exit_status, format_table, summary, to_json
from autosp_verify.run import run_case
from autosp_verify.simulators import NAMES


@dataclass(frozen=True)
class Config:
    model: str
    impl: str = "autosp"
    world_sizes: tuple = (2,)
    seq_lens: tuple = (16,)
    batch: int = 2
    dtype: str = "float64"
    simulator: str = "threaded"
    seed: int = 0
    timeout: float = 120.0
    json: str | None = None
    rtol: float | None = None
    atol: float | None = None
    junit_xml: str | None = None
    explore: int | None = None  # --explore N: search N cases for a failure (explore.py), not the grid
    explore_dtypes: tuple | None = None
    explicit: frozenset = frozenset()  # the options the command line gives (--explore's bounds)
    memory: bool = False
    compile_time: bool = False
    report: str | None = None
    steps: int = 2
    quiet: bool = False


def _int_list(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    values = _int_list(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _number(low: float, low_ok: bool):
    """argparse type: a finite float above ``low`` (or equal to it when ``low_ok``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < low or (value == low and not low_ok):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if low_ok else '>'} {low:g}, got {text!r}")
        return value
    return parse


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected 0 <= seed < 2**63, got {text!r}")
    return value


def _output_problem(path: str, directory: bool) -> str | None:
    """Why ``path`` cannot be written (checked before any case runs), or None."""
    target = os.path.abspath(path)
    if directory and os.path.isdir(target):
        return None if os.access(target, os.W_OK) else "not writable"
    if os.path.isdir(target):
        return "is a directory"
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        return f"its folder {parent} does not exist"
    return None if os.access(parent, os.W_OK) else f"its folder {parent} is not writable"


def _dtype_list(text: str) -> tuple:
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",")))
    bad = [v for v in values if v not in DTYPES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown dtype {', '.join(bad)}; choose from {', '.join(DTYPES)}")
    return values


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autosp-verify", description="Prove or disprove that a sequence-parallel "
                                "implementation of a model is exact against the model on one device.")
    p.add_argument("model", nargs="+", help="model file(s): a .py defining model_fn() and inputs_fn(batch, seq_len, "
                   "generator); several are verified one after the other (as a pre-commit hook passes them)")
    p.add_argument("--impl", default="autosp", help="autosp (default), autosp-wrap, deepspeed, deepspeed-eager, "
                   "alst, MODULE:CALLABLE or path/to/file.py:CALLABLE")
    p.add_argument("--world-size", type=_int_list, default=(2,), help="SP degrees, comma-separated (default 2)")
    p.add_argument("--seq-len", type=_int_list, default=(16,), help="sequence lengths, comma-separated (default 16)")
    p.add_argument("--batch", type=_positive_int, default=2)
    p.add_argument("--dtype", choices=list(DTYPES), default="float64")
    p.add_argument("--simulator", choices=NAMES, default="threaded")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--steps", type=_positive_int, default=2, help="batches the impl's prepared step runs on, "
                   "each another draw of inputs_fn, each compared (default 2: catches state kept from the "
                   "first call)")
    p.add_argument("--timeout", type=_number(0, False), default=120.0, help="seconds before a run counts as hung (default 120)")
    p.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("--rtol", type=_number(0, True), help="override the dtype's relative tolerance")
    p.add_argument("--atol", type=_number(0, True), help="override the dtype's absolute tolerance")
    p.add_argument("--junit-xml", metavar="PATH", help="also write a JUnit XML report, one testcase per case")
    p.add_argument("--explore", metavar="N", type=_positive_int, help="search N cases for a failure, shrink "
                   "it to the smallest, print the command reproducing it. Drawn: P from --world-size (default "
                   "2,4), S from 1 to --seq-len (default 64; from the smallest to the largest when several "
                   "are given), B from 1 to --batch (default 4)")
    p.add_argument("--explore-dtypes", metavar="D1,D2", type=_dtype_list, help="dtypes --explore draws "
                   "(default: --dtype)")
    p.add_argument("--memory", action="store_true", help="also estimate per-rank activation memory against one "
                   "device (runs every case once more, P positions longer)")
    p.add_argument("--compile-time", action="store_true", help="also time compiling with and without the passes "
                   "(autosp impls; three pairs of compiles per case, the ratio their median)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr (the table and verdict only)")
    p.add_argument("--report", metavar="DIR", help="write DIR/report.json and DIR/accounting.png (implies --memory)")
    return p


def _given_options(argv) -> frozenset:
    """The options the command line gives (argparse fills in defaults, so re-parse without them)."""
    p = get_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return frozenset(vars(p.parse_args(argv)))


def parse_args(argv=None) -> Config:
    """The Config of the first model file (see ``parse_all``)."""
    return parse_all(argv)[0]


def parse_all(argv=None) -> list:
    """One Config per model file given, the flags checked before any work."""
    parser = get_parser()
    a = parser.parse_args(argv)
    if len(a.model) > 1:
        alone = [flag for flag, given in (("--json", a.json), ("--junit-xml", a.junit_xml), ("--report", a.report),
                                          ("--explore", a.explore)) if given]
        if alone:
            parser.error(f"{', '.join(alone)}: one model file at a time ({len(a.model)} given)")
    if a.explore:
        alone = [flag for flag, given in (("--junit-xml", a.junit_xml), ("--report", a.report),
                                          ("--memory", a.memory), ("--compile-time", a.compile_time)) if given]
        if alone:
            parser.error(f"{', '.join(alone)}: not supported with --explore (it reports one shrunk failure)")
    for flag, path, directory in (("--json", a.json, False), ("--junit-xml", a.junit_xml, False),
                                  ("--report", a.report, True)):
        problem = path and _output_problem(path, directory)
        if problem:
            parser.error(f"{flag} {path}: {problem}")
    return [Config(model, a.impl, a.world_size, a.seq_len, a.batch, a.dtype, a.simulator, a.seed, a.timeout,
                   a.json, a.rtol, a.atol, memory=a.memory or bool(a.report), compile_time=a.compile_time,
                   report=a.report, junit_xml=a.junit_xml, steps=a.steps, quiet=a.quiet,
                   explore=a.explore, explore_dtypes=a.explore_dtypes,
                   explicit=_given_options(argv) if a.explore else frozenset())
            for model in a.model]


WORST_FIRST = (EXIT_USAGE, 1, 3, 4, 0)  # several model files: the run's status is the worst of theirs


def run(config: Config, out=None) -> int:
    out = out or sys.stdout  # looked up per call, so redirected stdout (tests, callers) is honoured
    if config.explore:
        from autosp_verify.explore import run_explore
        return run_explore(config, out)
    cases = []
    progress = Progress(len(config.world_sizes) * len(config.seq_lens), quiet=config.quiet)
    try:
        for world_size in config.world_sizes:
            for seq_len in config.seq_lens:
                spec = CaseSpec(config.model, config.impl, world_size, seq_len, config.batch, config.dtype, config.seed,
                                steps=config.steps)
                label, start = f"P={world_size} S={seq_len}", time.monotonic()
                with progress.case(label) as phase:
                    cases.append(run_case(spec, None, config.simulator, config.timeout, config.rtol, config.atol,
                                          memory=config.memory, compile_time=config.compile_time, phase=phase))
                progress.finished(label, cases[-1].status, time.monotonic() - start)
    except (ModelFileError, ImplUnavailable, ValueError) as exc:
        print(f"autosp-verify: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table(cases), file=out)
    print(summary(cases), file=out)
    if config.json:
        with open(config.json, "w") as f:
            f.write(to_json(cases) + "\n")
    if config.junit_xml:
        from autosp_verify.junit import write_junit_xml
        write_junit_xml(cases, config.junit_xml, model=config.model)
    if config.report:
        from autosp_verify.figure import write_png
        os.makedirs(config.report, exist_ok=True)
        with open(os.path.join(config.report, "report.json"), "w") as f:
            f.write(to_json(cases) + "\n")
        write_png(cases, os.path.join(config.report, "accounting.png"))
    return exit_status(cases)


def main(argv=None) -> int:
    try:
        configs = parse_all(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    codes = set()
    for config in configs:
        if len(configs) > 1:
            print(f"== {config.model}", flush=True)
        codes.add(run(config))
    return next(code for code in WORST_FIRST if code in codes)


if __name__ == "__main__":  # as the command: supervised (supervise.py)
    from autosp_verify.supervise import main as supervised_main
    sys.exit(supervised_main())
