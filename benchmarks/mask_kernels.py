"""How attention applies the masks HF builds: one training step's time, P=1 on the CPU.

    python benchmarks/mask_kernels.py                 # the cases below (~6 min on 2 cores)
    python benchmarks/mask_kernels.py --quick         # S = 1024 only

Under ``torch.compile`` HF builds an attention mask whenever it cannot prove it needs none
(``use_cache=False``, as here: its activation checkpointing sets it). Three ways to run the step:
plain ``torch.compile`` (HF's [S, S] mask applied by torch's attention), ``autosp.compile`` with
``attention_kernel="auto"`` (torch's fused kernel once per run of rows: autosp/mask_runs.py) and
with ``"blocks"`` (``autosp::masked_attention`` block by block). A 2-layer HF model (hidden 256,
4 q / 2 kv heads), float32, batch 1, ``aot_eager``, one process on a group of one (gloo), one
thread; forward + backward, median of 3 steps after 2. Real models, real masks: causal (Llama),
packed documents (Llama, restarting ``position_ids``), a sliding window (Mistral).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# (model, S, documents, sliding window)
CASES = [("llama", 1024, 1, None), ("llama", 4096, 1, None), ("llama", 4096, 8, None),
         ("mistral", 4096, 1, 1024), ("mistral", 8192, 1, 2048)]
MODES = {"plain": "torch.compile (HF's [S, S] mask)", "auto": "autosp, fused runs", "blocks": "autosp, blocks"}


def _model(name: str, window):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
    torch.manual_seed(0)
    shape = dict(vocab_size=128, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=512, max_position_embeddings=1 << 16, attn_implementation="sdpa", use_cache=False)
    if name == "mistral":
        return MistralForCausalLM(MistralConfig(sliding_window=window, **shape)).train()
    return LlamaForCausalLM(LlamaConfig(**shape)).train()


def _step_ms(name, seq_len, documents, window, mode) -> tuple[float, dict]:
    import autosp
    from autosp import masked_attention as ma
    model = _model(name, window)
    torch._dynamo.reset()
    if mode == "plain":
        step = torch.compile(model, backend="aot_eager", fullgraph=True)
    else:
        step = autosp.compile(model, config=autosp.SPConfig(backend="aot_eager", attention_kernel=mode))
    ids = torch.randint(0, 128, (1, seq_len), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    if documents > 1:
        batch["position_ids"] = torch.arange(seq_len).remainder(seq_len // documents)[None]
    for _ in range(2):
        step(**batch).loss.backward()
    ma.KERNELS.clear()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step(**batch).loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, dict(ma.KERNELS)


def main(argv=None) -> int:
    import torch.distributed as dist
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="S = 1024 only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29541")
    dist.init_process_group("gloo", rank=0, world_size=1)
    cases = [c for c in CASES if c[1] == 1024] if args.quick else CASES
    print(f"{'model, S, mask':34} " + "  ".join(f"{title:>34}" for title in MODES.values()))
    for name, seq_len, documents, window in cases:
        what = f"{name}, {seq_len}, " + (f"window {window}" if window else
                                         f"{documents} packed documents" if documents > 1 else "causal")
        cells = []
        for mode in MODES:
            ms, kernels = _step_ms(name, seq_len, documents, window, mode)
            cells.append(f"{ms:8.0f} ms {' '.join(f'{k} {v}' for k, v in sorted(kernels.items())):>20}")
        print(f"{what:34} " + "  ".join(f"{cell:>34}" for cell in cells), flush=True)
    print("step: forward + backward, median of 3 after 2; kernels: masked_attention's forward calls by kernel "
          "(fused: torch's, once per run; blocks: block by block) over the 3 steps")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
