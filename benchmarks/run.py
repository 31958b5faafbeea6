"""AutoSP benchmarks: plain-text tables and one PNG (not tests; nothing here asserts).

    python benchmarks/run.py --quick                 # ~3 min on 2 CPU cores
    python benchmarks/run.py --all --png benchmarks/results.png
    python benchmarks/run.py --compile --memory      # pick sections

Sections (see benchmarks/README.md for what each includes):
  --compile    compile seconds of autosp.compile(...).warm_up(P) over plain torch.compile, fwd+bwd
  --memory     per-rank sequence-long activation memory vs P, as a ratio to 1/P (the verifier's probe)
  --step-time  CPU training-step wall time on gloo, P = 1, 2, 4 processes, fixed total tokens
  --gpu        tokens/s and peak memory, P=1 through the passes vs plain torch.compile (CUDA only)
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

FIXTURE = os.path.join(ROOT, "fixtures", "hf_llama.py")


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    ram = ""
    try:
        with open("/proc/meminfo") as f:
            kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        ram = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores{ram}, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def table(title: str, header: list, rows: list, notes: list = ()) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [title, line(header)] + [line(r) for r in cells[1:]] + [f"  note: {n}" for n in notes]
    text = "\n".join(out)
    print(text + "\n", flush=True)
    return text


# --- compile time ---------------------------------------------------------------------------------

# name -> (fixture, config overrides). The fixtures' heads are 4 wide (the attention output kept
# twice); "head_dim 64" is hf_llama's config at a real model's head width (kept once: the path
# real models take, see SPConfig.attention_output).
COMPILE_MODELS = {
    "hf_llama": ("hf_llama", {}),
    "hf_mistral": ("hf_mistral", {}),
    "hf_qwen2": ("hf_qwen2", {}),
    "hf_qwen3_packed": ("hf_qwen3_packed", {}),
    "hf_olmo2_padded": ("hf_olmo2_padded", {}),
    "hf_llama@4": ("hf_llama", {"num_hidden_layers": 4}),
    "hf_llama head_dim 64": ("hf_llama", {"hidden_size": 512, "intermediate_size": 1024, "head_dim": 64}),
    "hf_llama eager": ("hf_llama", {"attn_implementation": "eager"}),  # attention written out (matmuls)
}
QUICK_COMPILE_MODELS = ("hf_llama", "hf_llama@4", "hf_llama head_dim 64")


def _compile_model(name: str):
    """(path, model_fn, inputs_fn) of a COMPILE_MODELS entry: the fixture, its config overridden."""
    from autosp_verify.core import model_functions
    fixture, overrides = COMPILE_MODELS[name]
    path = os.path.join(ROOT, "fixtures", f"{fixture}.py")
    model_fn, inputs_fn = model_functions(path)
    if overrides:
        def overridden():
            model = model_fn()
            return type(model)(type(model.config)(**{**model.config.to_dict(), **overrides})).to(model.dtype).train()
        return path, overridden, inputs_fn
    return path, model_fn, inputs_fn


def bench_compile(quick: bool) -> dict:
    """Compile seconds with and without the passes, per model, interleaved in one process."""
    from autosp_verify.accounting import compile_times
    from autosp_verify.core import CaseSpec, build_case

    backends = [("autosp", "aot_eager", 5)] if quick else [("autosp", "aot_eager", 5), ("autosp-inductor", "inductor", 2)]
    models = QUICK_COMPILE_MODELS if quick else tuple(COMPILE_MODELS)
    P, S, B = 4, 64, 2
    rows, data, warmed = [], [], False
    for name in models:
        path, model_fn, inputs_fn = _compile_model(name)
        for impl, backend, pairs in backends:
            spec = CaseSpec(path, impl, P, S, B, "float32", 0)
            base, batch = build_case(model_fn, inputs_fn, spec)
            if not warmed:  # discarded: the first compile in a process pays one-off imports and initialisation
                compile_times(spec, base, batch)
                warmed = True
            t = compile_times(spec, base, batch, pairs=pairs)
            data.append({"model": name, "backend": backend, "with": t["with_passes"], "without": t["without"],
                         "ratio": t["ratio"]})
            rows.append([name, backend, f"{t['without']:.2f}", f"{t['with_passes']:.2f}", f"{t['ratio']:.2f}x",
                         " ".join(f"{x:.2f}" for x in sorted(t["each_pair"])),
                         f"{t['without_cpu']:.2f} / {t['with_passes_cpu']:.2f}", pairs, loadavg()])
    text = table(f"Compile time, HF fixtures (name@N: N layers; head_dim 64: hidden 512), P={P}, S={S}, B={B}, float32, caches off",
                 ["model", "backend", "torch.compile s", "autosp s", "ratio", "each pair", "cpu s (plain / autosp)",
                  "pairs", "loadavg"],
                 rows, ["wall seconds, medians over the pairs; both include Dynamo tracing, AOTAutograd, the backend "
                        "and one forward + backward; autosp adds its passes and runs on a fake group of P ranks",
                        "ratio: the median of the pairs' ratios (each pair: both sides back to back, the one measured first "
                        "alternating; each side after torch._dynamo.reset(), gc and sympy's cache cleared)",
                        "fresh model copy and fresh backend object each run; fx_graph_cache and autograd cache off; one discarded "
                        "warm-up run first (imports)"])
    return {"rows": data, "text": text}


# --- memory ---------------------------------------------------------------------------------------

MEMORY_MODELS = [("hf_llama (head_dim 4)", FIXTURE),
                 ("wide heads (head_dim 16)", os.path.join(ROOT, "tests", "compiler", "wide_head_models.py"))]


def bench_memory(quick: bool) -> dict:
    from autosp_verify.run import verify_file

    S = 64 if quick else 256
    sizes = [2, 4] if quick else [2, 4, 8]
    rows, data = [], []
    for label, path in MEMORY_MODELS:
        for P in sizes:
            r = verify_file(path, impl="autosp", world_size=P, seq_len=S, batch=1, dtype=torch.float32,
                            simulator="threaded", memory=True)
            mem = (r.accounting or {}).get("memory") or {}
            ratio, total = mem.get("ratio"), mem.get("total_ratio")
            seq_ref = (mem.get("reference") or {}).get("seq")
            seq_rank = max((x["seq"] for x in mem.get("ranks") or []), default=None)
            data.append({"model": label, "P": P, "ratio": ratio, "total": total})
            fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
            rows.append([label, P, r.status, "-" if seq_ref is None else f"{seq_ref / 1024:.1f}",
                         "-" if seq_rank is None else f"{seq_rank / 1024:.1f}", fmt(ratio), f"{1 / P:.3f}",
                         "-" if ratio is None else f"{ratio * P:.2f}x", fmt(total), loadavg()])
    text = table(f"Per-rank activation memory, S={S} (total), B=1, float32, threaded simulator",
                 ["model", "P", "verdict", "1-dev seq KiB", "rank seq KiB", "ratio", "1/P", "ratio x P",
                  "total ratio", "loadavg"],
                 rows, ["seq KiB: sequence-long tensors saved for the backward (autosp_verify/accounting/), "
                        "largest rank vs one device compiled the same way without the passes",
                        "ratio x P = 1.00 would be the ideal 1/P; total ratio counts every saved tensor, "
                        "parameter-sized ones and any [S, S] tensor a rank holds whole",
                        "head_dim 4: the attention output kept twice (SPConfig(attention_output='auto') keeps the "
                        "Ulysses minimum in bytes there); head_dim 16: once"])
    return {"rows": data, "text": text, "S": S}


# --- step time on gloo ----------------------------------------------------------------------------

STEP = {"vocab": 128, "hidden": 64, "layers": 2, "heads": 8, "kv_heads": 2, "ffn": 128}


def _step_worker(rank, world_size, port, mode, seq_len, batch, steps, warmup, out_path, backend):
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import autosp
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # one intra-op thread per process: 2 threads on a shared 2-core machine stall erratically
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=STEP["vocab"], hidden_size=STEP["hidden"], num_hidden_layers=STEP["layers"],
                         num_attention_heads=STEP["heads"], num_key_value_heads=STEP["kv_heads"],
                         intermediate_size=STEP["ffn"], max_position_embeddings=max(2048, seq_len),
                         attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    if mode == "plain":
        step = torch.compile(model, backend=backend, fullgraph=True)
    else:  # "autosp-blocks": what the fused runs save (HF's mask kept on the blocks)
        kernel = "blocks" if mode == "autosp-blocks" else "auto"
        step = autosp.compile(model, config=autosp.SPConfig(backend=backend, attention_kernel=kernel))
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(0, STEP["vocab"], (batch, seq_len), generator=torch.Generator().manual_seed(i))
        dist.barrier()
        start = time.perf_counter()
        loss = step(input_ids=ids, labels=ids).loss
        loss.backward()
        if mode != "plain" and world_size > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step ends when the slowest rank ends
        if i >= warmup:
            times.append(elapsed.item())
    if rank == 0:
        torch.save({"times": times, "loss": loss.item()}, out_path)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_step_time(quick: bool) -> dict:
    import torch.multiprocessing as mp

    S, B = (256, 1) if quick else (1024, 1)
    steps, warmup = (3, 1) if quick else (5, 1)
    backend = "aot_eager"
    cases = [("plain", 1), ("autosp", 1), ("autosp-blocks", 1), ("autosp", 2)] + ([] if quick else [("autosp", 4)])
    rows, data = [], []
    cores = os.cpu_count() or 1
    for mode, P in cases:
        with tempfile.TemporaryDirectory(prefix="autosp-bench-") as folder:
            out = os.path.join(folder, "times.pt")
            start = time.perf_counter()
            mp.spawn(_step_worker, args=(P, _free_port(), mode, S, B, steps, warmup, out, backend), nprocs=P, join=True)
            total = time.perf_counter() - start
            result = torch.load(out)
        med = statistics.median(result["times"])
        data.append({"mode": mode, "P": P, "step_s": med})
        label = {"plain": "torch.compile (no passes)", "autosp": "autosp.compile",
                 "autosp-blocks": "autosp.compile, mask on the blocks"}[mode]
        rows.append([label, P, f"{med * 1000:.0f}", f"{B * S / med:,.0f}", f"{result['loss']:.4f}",
                     f"{total:.0f}", 1, loadavg()])
    base = next(d["step_s"] for d in data if d["mode"] == "autosp" and d["P"] == 1)
    for row, d in zip(rows, data):
        row.insert(3, f"{d['step_s'] / base:.2f}")
    notes = [f"tiny HF Llama ({STEP['layers']} layers, hidden {STEP['hidden']}, {STEP['heads']} q / "
             f"{STEP['kv_heads']} kv heads, vocab {STEP['vocab']}), backend={backend}, float32; one step = forward, "
             "backward, gradient all-reduce (P>1), SGD step; median of the slowest rank's step over "
             f"{steps} steps after {warmup} warm-up",
             "use_cache=False: HF builds an attention mask; its rows are one causal run, so autosp runs torch's "
             "fused kernel (autosp/mask_runs.py); 'mask on the blocks': SPConfig(attention_kernel='blocks')",
             f"one intra-op thread per process; this machine has {cores} cores: P > {cores} oversubscribes "
             "(more processes than cores), so such rows measure contention as much as sequence parallelism"]
    text = table(f"CPU step time on gloo, total S={S}, B={B} (fixed total tokens {S * B})",
                 ["compile", "P", "step ms", "vs autosp P=1", "tokens/s", "last loss", "launch+run s",
                  "threads/proc", "loadavg"], rows, notes)
    return {"rows": data, "text": text}


# --- GPU ------------------------------------------------------------------------------------------

def _gpu_run(mode, seq_len, batch, steps, warmup):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    import autosp
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, intermediate_size=2816, max_position_embeddings=max(4096, seq_len),
                         attn_implementation="sdpa", use_cache=False)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    step = torch.compile(model, backend="inductor", fullgraph=True) if mode == "plain" else \
        autosp.compile(model, backend="inductor")
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), device="cuda")
    for _ in range(warmup):
        step(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del dist
    return {"tokens_s": steps * batch * seq_len / elapsed, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def bench_gpu(quick: bool) -> dict | None:
    if not torch.cuda.is_available():
        print("GPU: no GPU here (torch.cuda.is_available() is False); skipped\n", flush=True)
        return None
    import torch.distributed as dist
    S, B = (2048, 1) if quick else (4096, 2)
    steps, warmup = (5, 2) if quick else (20, 3)
    rows, data = [], []
    for mode in ("plain", "autosp"):
        if mode == "autosp":
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
            dist.init_process_group("nccl", rank=0, world_size=1)
        try:
            r = _gpu_run(mode, S, B, steps, warmup)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        data.append({"mode": mode, **r})
        torch.cuda.empty_cache()
    base = data[0]
    for d in data:
        rows.append(["torch.compile (no passes)" if d["mode"] == "plain" else "autosp.compile, P=1",
                     f"{d['tokens_s']:,.0f}", f"{d['tokens_s'] / base['tokens_s']:.3f}", f"{d['peak_gib']:.2f}",
                     f"{d['peak_gib'] / base['peak_gib']:.3f}"])
    text = table(f"GPU ({torch.cuda.get_device_name()}), Llama 8 layers hidden 1024, bf16, S={S}, B={B}, Inductor",
                 ["compile", "tokens/s", "vs plain", "peak GiB", "vs plain"], rows,
                 [f"{steps} timed steps after {warmup} warm-up; peak = torch.cuda.max_memory_allocated over the "
                  "timed steps (parameters, gradients, activations)"])
    return {"rows": data, "text": text}


# --- PNG ------------------------------------------------------------------------------------------

def write_png(path: str, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("compile", "memory", "step", "gpu") if results.get(k)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels):
        rows = results[key]["rows"]
        if key == "compile":
            x = range(len(rows))
            ax.bar([i - 0.2 for i in x], [r["without"] for r in rows], 0.4, label="torch.compile")
            ax.bar([i + 0.2 for i in x], [r["with"] for r in rows], 0.4, label="autosp.compile")
            ax.set_xticks(list(x), [f"{r['model']}\n{r['backend']}\n{r['ratio']:.2f}x" for r in rows], fontsize=6)
            ax.set_ylabel("compile s (fwd+bwd)")
            ax.set_title("Compile time")
            ax.legend(fontsize=8)
        elif key == "memory":
            for model in dict.fromkeys(r["model"] for r in rows):
                mine = [r for r in rows if r["model"] == model]
                ax.plot([r["P"] for r in mine], [r["ratio"] for r in mine], "o-", label=f"{model}: seq-long")
                ax.plot([r["P"] for r in mine], [r["total"] for r in mine], "s--", label=f"{model}: all saved")
            ps = sorted({r["P"] for r in rows})
            ax.plot(ps, [1 / p for p in ps], "k:", label="1/P")
            ax.set_xscale("log", base=2)
            ax.set_xticks(ps, [str(p) for p in ps])
            ax.set_xlabel("P")
            ax.set_ylabel("per-rank memory ratio")
            ax.set_title(f"Activation memory, S={results['memory']['S']}")
            ax.legend(fontsize=8)
        elif key == "step":
            labels = [("plain" if r["mode"] == "plain" else "autosp") + f"\nP={r['P']}" for r in rows]
            ax.bar(range(len(rows)), [r["step_s"] * 1000 for r in rows],
                   color=["gray" if r["mode"] == "plain" else "C0" for r in rows])
            ax.set_xticks(range(len(rows)), labels)
            ax.set_ylabel("step ms (CPU, gloo)")
            ax.set_title("Step time, fixed total tokens")
        elif key == "gpu":
            ax.bar(range(len(rows)), [r["tokens_s"] for r in rows])
            ax.set_xticks(range(len(rows)), [r["mode"] for r in rows])
            ax.set_ylabel("tokens/s")
            ax.set_title("GPU, P=1")
    fig.suptitle(machine(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--step-time", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--all", action="store_true", help="every section (the default when none is named)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats (~3 min on 2 cores)")
    parser.add_argument("--png", metavar="PATH", help="write the figure here")
    args = parser.parse_args(argv)
    every = args.all or not (args.compile or args.memory or args.step_time or args.gpu)
    print(f"machine: {machine()}\nload average at start: {loadavg()}\n", flush=True)
    results, start = {}, time.perf_counter()
    if every or args.compile:
        results["compile"] = bench_compile(args.quick)
    if every or args.memory:
        results["memory"] = bench_memory(args.quick)
    if every or args.step_time:
        results["step"] = bench_step_time(args.quick)
    if every or args.gpu:
        results["gpu"] = bench_gpu(args.quick)
    print(f"total {time.perf_counter() - start:.0f} s; load average at end: {loadavg()}")
    if args.png:
        write_png(args.png, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
