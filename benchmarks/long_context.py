"""Long context on the CPU: the peak live memory and the time of one training step against S.

    python benchmarks/long_context.py                       # S = 1k..8k, P = 1, 2, 4 (~8 min on 2 cores)
    python benchmarks/long_context.py --seq-lens 2048,4096 --world-sizes 1,8

One device runs HF's eager model (``is_causal``, no mask) and plain ``torch.compile`` of it (which,
under transformers 5.x, builds a bool [B, 1, S, S] mask); ``autosp P=N`` runs ``autosp.compile``
for N ranks on rank 0 of torch's fake process group (real tensors; the collectives move no data,
so the time is compute alone). Each point is a fresh process: one warm-up step (compiles), then
the peak of live CPU bytes over one forward + backward (``autosp_verify.peak``, from torch's own
allocation events: parameters and the batch, allocated before, are not in it), and the wall time
of another step, unprofiled. Real tensors, a small width: HF Llama, 2 layers, hidden 64, 8 heads,
float32, batch 1, ``aot_eager`` (the partitioner Inductor uses, without codegen).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
MODES = ("eager", "compile", "autosp")


def _model(seq_len):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=128, max_position_embeddings=seq_len,
                         use_cache=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).train()


def _step_fn(model, mode, world_size):
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import autosp
    if mode == "eager":
        return model
    if mode == "compile":
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        return lambda **batch: compiled(**{k: autosp.prepare_inputs(v)[0] for k, v in batch.items()})
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    return autosp.compile(model, backend="aot_eager")


def point(mode: str, seq_len: int, world_size: int) -> dict:
    """Peak live bytes and seconds of one training step (run in a fresh process)."""
    import torch

    from autosp_verify.peak import PeakMemory
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = _model(seq_len)
    ids = torch.randint(0, 128, (1, seq_len), generator=torch.Generator().manual_seed(0))
    step = _step_fn(model, mode, world_size)

    def train_step():
        loss = step(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    train_step()  # compiles
    with PeakMemory() as peak:
        train_step()
    start = time.perf_counter()
    train_step()
    return {"mode": mode, "S": seq_len, "P": world_size, "peak": peak.bytes, "seconds": time.perf_counter() - start}


def _run_point(mode, seq_len, world_size) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--point", mode, str(seq_len), str(world_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        return {"mode": mode, "S": seq_len, "P": world_size, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(lines[-1])


def bench(seq_lens, world_sizes) -> dict:
    columns = [("eager", 1), ("compile", 1)] + [("autosp", p) for p in world_sizes]
    results = [_run_point(mode, s, p) for s in seq_lens for mode, p in columns]
    by_key = {(r["mode"], r["S"], r["P"]): r for r in results}
    mib = lambda r: "error" if "error" in r else f"{r['peak'] / 2**20:.1f}"  # noqa: E731
    header = ["S"] + [f"{m} P={p}" if m == "autosp" else f"1-dev {m}" for m, p in columns]
    peak_rows = [[s] + [mib(by_key[(m, s, p)]) for m, p in columns] for s in seq_lens]
    per_token = [[s] + ["-" if "error" in by_key[(m, s, p)] else f"{by_key[(m, s, p)]['peak'] / s / 1024:.1f}"
                        for m, p in columns] for s in seq_lens]
    secs = [[s] + ["-" if "error" in by_key[(m, s, p)] else f"{by_key[(m, s, p)]['seconds']:.2f}"
                   for m, p in columns] for s in seq_lens]
    errors = [f"{r['mode']} S={r['S']} P={r['P']}: {r['error']}" for r in results if "error" in r]
    from benchmarks.run import loadavg, table
    notes = ["peak live CPU bytes of one forward + backward (torch's allocation events), parameters and batch excluded",
             "autosp P=N: rank 0 of N on torch's fake process group (real tensors, collectives move no data)",
             f"loadavg {loadavg()}"] + errors
    text = "\n".join([
        table("Peak memory per rank, MiB (HF Llama, 2 layers, hidden 64, 8 heads, float32, B=1, aot_eager)",
              header, peak_rows, notes),
        table("The same, KiB per token of the whole sequence (flat: linear in S; growing: quadratic)",
              header, per_token),
        table("Seconds per training step (one step, unprofiled; autosp: compute alone, no communication)",
              header, secs)])
    return {"rows": results, "text": text}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", default="1024,2048,4096,8192")
    parser.add_argument("--world-sizes", default="1,2,4")
    parser.add_argument("--point", nargs=3, metavar=("MODE", "S", "P"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:
        mode, seq_len, world_size = args.point[0], int(args.point[1]), int(args.point[2])
        if mode not in MODES:
            parser.error(f"mode {mode!r}: one of {MODES}")
        print(json.dumps(point(mode, seq_len, world_size)), flush=True)
        return 0
    bench([int(s) for s in args.seq_lens.split(",")], [int(p) for p in args.world_sizes.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
