"""Compile time with and without the passes (opt-in, see the package doc)."""
from __future__ import annotations

import copy
import gc
import statistics
import time

import torch

from autosp_verify.accounting.saved import _mark_sequence
from autosp_verify.core import lifted_recompile_limit
from autosp_verify.outputs import split_output


def _fresh(backend: str):
    """A backend object Dynamo has never seen, compiling with ``backend``: no cache entry applies."""
    def fresh(gm, example_inputs):
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)
    return fresh


def _same_start() -> None:
    """Both sides start from the same state: Dynamo reset (its caches and the entries of every
    compile before: otherwise each compile starts with more of them, and a later side pays for
    them; models compiled earlier in the process compile again on their next call), no garbage
    of the compile before (collected here, not inside the timing) and sympy's expression cache
    empty (it lives across compiles in a process, so the side measured second would find the
    first one's sizes cached), nor FakeTensor's dispatch cache (also process-wide). The heap
    left by the process's earlier compiles is frozen (``gc.freeze``): otherwise the collections
    during a compile scan it, and their cost grows with every compile measured before (single
    compiles moved by +-25%)."""
    import sympy.core.cache
    from torch._subclasses.fake_tensor import FakeTensorMode
    torch._dynamo.reset()
    sympy.core.cache.clear_cache()
    FakeTensorMode.cache_clear()
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def compile_times(spec, base, batch, pairs: int = 1) -> dict | None:
    """Seconds to compile with the passes (autosp.compile + warm_up) and without (torch.compile),
    forward and backward each, for the named autosp impls; None for other impls.

    ``pairs`` measurements of both sides back to back, the side measured first alternating (a
    process's state drifts); one compile of the same model moves by up to +-25% between runs on a
    shared machine, so ``ratio`` is the median of the pairs' ratios (``each_pair``), and the
    seconds are medians over the pairs."""
    from autosp_verify.impls import _AUTOSP_IMPLS
    backend = {"autosp": "aot_eager", "autosp-eager": "eager", "autosp-inductor": "inductor"}.get(spec.impl)
    if not isinstance(spec.impl, str) or spec.impl not in _AUTOSP_IMPLS or backend is None:
        return None
    import torch._functorch.config
    import torch._inductor.config

    runs = []
    with lifted_recompile_limit(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        try:
            for i in range(pairs):
                order = ("plain", "autosp") if i % 2 == 0 else ("autosp", "plain")
                runs.append({side: _timed(side, spec, base, batch, backend) for side in order})
        finally:
            gc.unfreeze()
    median = lambda side, j: statistics.median(r[side][j] for r in runs)  # noqa: E731
    return {"with_passes": median("autosp", 0), "without": median("plain", 0),
            "with_passes_cpu": median("autosp", 1), "without_cpu": median("plain", 1),
            "ratio": statistics.median(r["autosp"][0] / r["plain"][0] for r in runs),
            "each_pair": [r["autosp"][0] / r["plain"][0] for r in runs], "backend": backend}


def _timed(side: str, spec, base, batch, backend: str) -> tuple[float, float]:
    """(wall s, this process's CPU s) of one side's compile plus one forward and backward."""
    import autosp
    _same_start()
    model = copy.deepcopy(base)
    start, cpu = time.perf_counter(), time.process_time()
    if side == "autosp":
        autosp.compile(model, backend=_fresh(backend)).warm_up(spec.world_size, **batch)
    else:
        from autosp.api import hf_warnings_ignored
        compiled = torch.compile(model, backend=_fresh(backend), fullgraph=True)
        with hf_warnings_ignored():  # as autosp.compile traces
            loss, _ = split_output(compiled(**_mark_sequence(batch, spec.seq_len)))
        params = [p for p in model.parameters() if p.requires_grad]
        if loss.requires_grad and params:
            torch.autograd.grad(loss, params, allow_unused=True)
    return time.perf_counter() - start, time.process_time() - cpu
