"""The GPU tier, run by ``tox -e gpu`` (``pytest -m gpu``); every test here skips, with the
reason, where there are too few GPUs, so the CPU suite and CI collect and skip them.

- N >= 2 GPUs: the verifier on the nccl simulator, one rank per GPU, at P = N and every power of
  two below it, on the bundled HF Llama in float32 and bfloat16 (the tolerance table's entries),
  impls ``autosp`` and ``autosp-inductor``, at a length P divides and one it does not.
- >= 2 GPUs: LFM2 (short convolutions: halo exchanges) at P = 2, float32 and bfloat16.
- >= 1 GPU: one table: P = 1 compiled through the passes on the GPU (a world group of size 1
  over NCCL) and autosp-wrap on LLaVA, each against the uncompiled model on the same GPU, then
  tokens/s and peak memory with and without the passes; and the same cases at P = 2 on CPU over
  gloo (the CPU verifier run), so one session shows both.

Nothing CUDA-only is imported or initialised at import time: the GPU count used to pick the
world sizes is NVML's (``torch.cuda.device_count()``, which does not initialise CUDA; 0 on a CPU
build of torch); each test decides to skip with the nccl simulator's own reason.
"""
import copy
import os

import pytest
import torch

from autosp_verify import verify_file
from autosp_verify.simulators.nccl import unavailable

pytestmark = pytest.mark.gpu

FIXTURES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "fixtures"))
HF_LLAMA, HF_LLAVA = os.path.join(FIXTURES, "hf_llama.py"), os.path.join(FIXTURES, "hf_llava.py")
LFM2 = os.path.join(os.path.dirname(__file__), "..", "compiler", "lfm2_model.py")
DTYPES = ["float32", "bfloat16"]  # their tolerances: autosp_verify.compare.TOLERANCES
IMPLS = ["autosp", "autosp-inductor"]
SEQ_LENS = (16, 13)  # one every P here divides, one none does
TIMEOUT = 600.0  # Inductor compiles in every rank


def _world_sizes() -> list:
    """P = the GPU count and every power of two from 2 below it; [2] (which skips) with fewer than 2."""
    found = torch.cuda.device_count()
    sizes = {2 ** k for k in range(1, max(found, 2).bit_length())}
    if found >= 2:
        sizes.add(found)
    return sorted(sizes)


def _skip_unless(world_size: int):
    reason = unavailable(world_size)
    if reason:
        pytest.skip(reason)


@pytest.mark.multiproc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("world_size", _world_sizes(), ids=lambda p: f"P{p}")
def test_hf_llama_on_nccl(world_size, impl, dtype):
    _skip_unless(world_size)
    for seq_len in SEQ_LENS:
        r = verify_file(HF_LLAMA, impl=impl, simulator="nccl", world_size=world_size, seq_len=seq_len,
                        dtype=dtype, timeout=TIMEOUT)
        assert r.status == "pass", (seq_len, r.status, r.error, r.failures[:5])


@pytest.mark.multiproc
@pytest.mark.parametrize("dtype", DTYPES)
def test_lfm2_halos_on_nccl(dtype):
    """LFM2 as loaded (short convolutions: halos sent with uneven split sizes, on NCCL) at P = 2."""
    _skip_unless(2)
    for seq_len in SEQ_LENS:
        r = verify_file(LFM2, impl="autosp", simulator="nccl", world_size=2, seq_len=seq_len, dtype=dtype,
                        timeout=TIMEOUT)
        assert r.status == "pass", (seq_len, r.status, r.error, r.failures[:5])


def one_device_case(impl: str, dtype: str, seq_len: int, device: torch.device, store_path: str, path=HF_LLAMA):
    """P = 1: ``impl`` (autosp.compile over a world group of size 1 on ``device``: NCCL on a GPU,
    gloo on CPU) against the uncompiled model on the same device. Returns the Comparison."""
    import torch.distributed as dist

    from autosp_verify.compare import compare, tolerance_for
    from autosp_verify.core import DTYPES as CASE_DTYPES
    from autosp_verify.core import CaseSpec, LoadedCase, build_case, rank_fn, reference
    from autosp_verify.model_file import load_model_file
    from autosp_verify.simulators.base import RankContext

    loaded = load_model_file(path)
    spec = CaseSpec(path, impl, world_size=1, seq_len=seq_len, batch=2, dtype=dtype, seed=0)
    base, batch = build_case(loaded.model_fn, loaded.inputs_fn, spec)
    assert not dist.is_initialized(), "a process group is already initialised in this process"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.FileStore(store_path, 1),
                            rank=0, world_size=1)
    try:
        with torch._dynamo.config.patch(recompile_limit=100_000, accumulated_recompile_limit=100_000):
            ref = reference(copy.deepcopy(base).to(device), {k: v.to(device) for k, v in batch.items()}, spec)
            ranks = [rank_fn(RankContext(0, 1, dist.group.WORLD, device), LoadedCase(spec, base, batch))]
    finally:
        dist.destroy_process_group()
    return compare(ref, ranks, tolerance_for(CASE_DTYPES[dtype]))


ONE_GPU_CASES = [(HF_LLAMA, impl, dtype) for impl in IMPLS for dtype in DTYPES] + [(HF_LLAVA, "autosp-wrap", "float32")]


def _row(path, impl, dtype, seq_len, cmp) -> list:
    worst = cmp.worst_grad if getattr(cmp, "worst_grad", None) else None
    return [os.path.basename(path), impl, dtype, str(seq_len), f"{cmp.loss.abs_err:.2e}",
            "-" if worst is None else f"{worst.name} ({worst.rel_err:.2e})", "PASS" if cmp.passed else "FAIL"]


def test_one_gpu_tier_prints_one_table(tmp_path, capsys):
    """One GPU, one table: P = 1 through the passes (autosp: aot_eager, autosp-inductor) and
    autosp-wrap on a vision-language fixture, each against the uncompiled model on the same GPU,
    float32 and bfloat16 under the table's tolerances; then tokens/s and peak memory with and
    without the passes (benchmarks/run.py's GPU section). Within 5 minutes on one GPU."""
    _skip_unless(1)
    rows, failed = [], []
    for n, (path, impl, dtype) in enumerate(ONE_GPU_CASES):
        for seq_len in SEQ_LENS:
            cmp = one_device_case(impl, dtype, seq_len, torch.device("cuda", 0), str(tmp_path / f"store{n}-{seq_len}"),
                                  path)
            rows.append(_row(path, impl, dtype, seq_len, cmp))
            if not cmp.passed:
                failed.append((path, impl, dtype, seq_len, cmp.failures()[:3]))
    from benchmarks.run import bench_gpu, table
    with capsys.disabled():
        table(f"GPU tier on {torch.cuda.get_device_name()}: P = 1 against the model on the same GPU",
              ["model", "impl", "dtype", "S", "loss err", "worst grad (rel err)", "verdict"], rows)
        bench_gpu(quick=True)
    assert not failed, failed
@pytest.mark.multiproc
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_the_same_case_on_cpu_over_gloo(impl, dtype):
    """Next to the one-GPU run, in the same session: the case at P = 2 on CPU, over gloo."""
    _skip_unless(1)
    for seq_len in SEQ_LENS:
        r = verify_file(HF_LLAMA, impl=impl, simulator="gloo", world_size=2, seq_len=seq_len, dtype=dtype,
                        timeout=TIMEOUT)
        assert r.status == "pass", (seq_len, r.status, r.error, r.failures[:5])
