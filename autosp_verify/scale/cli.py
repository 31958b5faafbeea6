"""``python -m autosp_verify.scale MODEL.py``: per-rank peak memory of one training step at real
sizes, and the longest sequence that fits a budget, for one device, plain DP and autosp.

Exit status: 0 done (refused scenarios are listed, not errors); 2 bad usage or model file.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from autosp.errors import AutoSPError
from autosp_verify.model_file import ModelFileError
from autosp_verify.scale.report import (Longest, longest_table, parse_bytes, parse_tokens, points_table,
                                        to_json, write_png)
from autosp_verify.scale.simulate import IMPLS, Scenario, Simulator
from autosp_verify.scale.state import Training

EXIT_USAGE = 2


def _world_sizes(text: str) -> list:
    """``1,8,64,32x2`` -> [(sp, dp), ...] (``SPxDP``: SP ranks times DP replicas)."""
    out = []
    for item in text.split(","):
        sp, _, dp = item.strip().lower().partition("x")
        try:
            pair = (int(sp), int(dp or 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected P or SPxDP, got {item!r}") from None
        if min(pair) < 1:
            raise argparse.ArgumentTypeError(f"ranks must be >= 1, got {item!r}")
        out.append(pair)
    return out


def _choices(allowed):
    def parse(text: str) -> list:
        values = [v.strip() for v in text.split(",")]
        bad = [v for v in values if v not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
        return values
    return parse


def _arg(parse):
    """``parse`` for argparse: its ValueError's message becomes the usage error."""
    def parse_arg(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse_arg


def _lengths(text: str) -> list:
    values = [parse_tokens(v) for v in text.split(",")]
    if min(values) < 2:
        raise ValueError(f"sequence lengths must be at least 2, got {text!r}")
    return values


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m autosp_verify.scale", description="Simulate the per-rank "
                                "peak memory of one training step (forward, backward, optimizer step) at real "
                                "sizes, on fake tensors: no weights, no accelerator.")
    p.add_argument("model", help="model file (model_fn, inputs_fn), e.g. fixtures/scale_llama3_8b.py")
    p.add_argument("--world-size", type=_world_sizes, default=_world_sizes("1,8,64"),
                   help="ranks, comma-separated: P (SP degree) or SPxDP (default 1,8,64)")
    p.add_argument("--seq-len", type=_arg(_lengths), default=[2**17, 2**20],
                   help="lengths to break down (128k = 131072; default 128k,1M)")
    p.add_argument("--budget", type=_arg(parse_bytes), default=parse_bytes("80GiB"),
                   help="per-rank bytes (default 80GiB)")
    p.add_argument("--impl", type=_choices(IMPLS), default=list(IMPLS), help="one_device, plain_dp, autosp")
    p.add_argument("--checkpointing", type=_choices(("none", "selective")), default=["none", "selective"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", help="parameters, gradients, activations (default bfloat16)")
    p.add_argument("--master", default="float32", help="master weights dtype, or none (default float32)")
    p.add_argument("--zero", type=int, choices=(0, 1), default=1, help="1: master and Adam states sharded over "
                   "DP x SP (default); 0: replicated")
    p.add_argument("--attention-block-elements", type=int, default=0, help="SPConfig.attention_block_elements")
    p.add_argument("--full-trace", action="store_true", help="trace every layer (default: 5 layers, extended)")
    p.add_argument("--png", metavar="PATH", help="also write a figure")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p


def scenarios(args) -> list:
    out = []
    for ckpt in (None if c == "none" else c for c in args.checkpointing):
        if "one_device" in args.impl:
            out.append(Scenario("one_device", checkpointing=ckpt))
        for sp, dp in args.world_size:
            if "plain_dp" in args.impl and sp * dp > 1:
                out.append(Scenario("plain_dp", dp=sp * dp, checkpointing=ckpt))
            if "autosp" in args.impl:
                out.append(Scenario("autosp", sp=sp, dp=dp, checkpointing=ckpt))
    return list(dict.fromkeys(out))


def simulate_all(sim: Simulator, todo: list, lengths: list, budget: int):
    points, refused, results, curves = [], {}, [], {}
    grid = sorted({2**k for k in range(10, 21)} | set(lengths))
    for sc in todo:
        try:
            points += [sim.point(sc, n) for n in lengths]
            results.append(Longest(sc, sim.longest(sc, budget)))
            curves[sc.label] = (sc, [sim.point(sc, n) for n in grid if n >= sim.shortest(sc)])
        except AutoSPError as exc:
            why = str(exc).splitlines()[0]
            refused[sc.label] = why
            results.append(Longest(sc, None, why))
    return points, refused, results, curves


def run(args, out=None) -> int:
    out = out or sys.stdout
    start = time.perf_counter()
    training = Training(dtype=args.dtype, master=None if args.master == "none" else args.master, zero=args.zero)
    sim = Simulator.from_file(args.model, training=training, batch=args.batch,
                              block_elements=args.attention_block_elements, full_trace=args.full_trace)
    points, refused, results, curves = simulate_all(sim, scenarios(args), args.seq_len, args.budget)
    traced = sim.traced()
    seconds = [t[3] for t in traced]
    elapsed = time.perf_counter() - start
    print(f"{args.model}: {sim.sizes['param_numel'] / 1e9:.2f} B parameters, {sim.layers} layers, batch "
          f"{args.batch}, {args.dtype}, master {args.master}, Adam, ZeRO-{args.zero} over DP x SP\n", file=out)
    print(points_table(points, refused) + "\n", file=out)
    print(longest_table(results, args.budget) + "\n", file=out)
    how = "; ".join(sorted({t[4] for t in traced}))
    print(f"{len(traced)} graphs traced ({how}) in {sum(seconds):.0f} s (longest {max(seconds, default=0):.0f} s); "
          f"{elapsed:.0f} s in all", file=out)
    meta = {"model": args.model, "budget": args.budget, "training": vars(training), "seconds": elapsed}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(points, results, meta), f, indent=1)
    if args.png:
        write_png(curves, results, args.budget, args.png, title=args.model)
    return 0


def main(argv=None) -> int:
    try:
        args = get_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        return run(args)
    except (ModelFileError, ValueError) as exc:
        print(f"autosp_verify.scale: {exc}", file=sys.stderr)
        return EXIT_USAGE
