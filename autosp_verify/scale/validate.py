"""Check the simulator against a real step: measure one training step's peak on CPU tensors at a
small size and compare it with the program's prediction for the same graphs.

The real step runs rank 0 of a fake process group (collectives complete alone: the numbers are
meaningless, the allocations are not) through ``CaptureBackend``, so it executes exactly the
forward and backward graphs the simulator reads; ``autosp_verify.peak.PeakMemory`` reads the
peak from the profiler's allocation events (a dispatch mode cannot watch compiled graphs).
It runs on one intra-op thread: kernels' per-thread scratch space is then one thread's, and a
2-core machine running other jobs is not oversubscribed (OpenMP threads spinning against each
other made a 2 s step take minutes).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from autosp_verify.peak import PeakMemory
from autosp_verify.scale.evaluate import Evaluator, evaluate
from autosp_verify.scale.program import Program
from autosp_verify.scale.trace import (CaptureBackend, Trace, _guards, _local_lengths, _sequence_symbols,
                                       compiled_step, fake_world)


@dataclass
class Measurement:
    peak: int  # bytes above what was live when the step started (parameters, inputs)
    trace: Trace  # the graphs the step ran


@contextlib.contextmanager
def one_thread():
    """torch's intra-op threads set to one inside the block (restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure(model_fn, inputs_fn, *, impl: str, world_size: int, seq_len: int, batch: int = 1,
            dtype: torch.dtype = torch.float32, checkpointing: str | None = None, block_elements: int = 0,
            seed: int = 0) -> Measurement:
    """Forward and backward of one step on real tensors (the second call: the first compiles);
    the caller's outputs are dropped after the forward, as a training loop does."""
    torch.manual_seed(seed)
    model = model_fn().to(dtype).train()
    backend = CaptureBackend(checkpointing)
    torch._dynamo.reset()
    with fake_world(world_size), one_thread():
        step = compiled_step(model, impl, backend, block_elements)
        inputs = inputs_fn(batch, seq_len, torch.Generator().manual_seed(seed))
        step(**inputs).loss.backward()
        for p in model.parameters():
            p.grad = None
        with PeakMemory() as peak:
            loss = step(**inputs).loss
            loss.backward()
        del loss
    captured = backend.last()
    torch._dynamo.reset()
    symbols = _sequence_symbols(captured)
    trace = Trace(captured, symbols, _guards(captured), world_size, impl, checkpointing,
                  None, {"batch": batch, "dtype": str(dtype).removeprefix("torch."), "block_elements": block_elements},
                  _local_lengths(captured, symbols))
    return Measurement(peak.bytes, trace)


def predicted_peak(program: Program, seq_len: int, **kwargs) -> int:
    """The program's peak above what is live when the step starts (the caller's inputs): the
    quantity ``measure`` reads. ``kwargs`` go to ``evaluate`` (the negative controls)."""
    ev = Evaluator(program.symbols, seq_len, 1, {}, program.local_lengths)
    inputs = sum(ev.int(b.nbytes) for b in program.buffers if b.birth == 0)
    return evaluate(program, seq_len, **kwargs).total - inputs
