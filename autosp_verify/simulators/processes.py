"""P real processes (spawn), one rank each, over a FileStore: shared by the gloo and nccl simulators.

Results come back through files in a private temporary folder (``rank{r}.pt``: the result, or a
failure with the time it happened so the parent can name the rank that failed first). A child
that finished waits to be terminated rather than exiting, so it never tears down a connection a
slower peer still reads from; the parent terminates every child when it has all results, on the
first failure, or at the timeout.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta

import torch

from autosp_verify.simulators.base import RankContext, RankFailure, SimulationError, failure_from_exception

# Several ranks share few cores: one intra-op thread each, no Inductor compile pool per child.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
_POLL_S = 0.02


@contextmanager
def _child_env():
    saved = {k: os.environ.get(k) for k in CHILD_ENV}
    os.environ.update(CHILD_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _save(path, obj):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)  # the parent never reads a half-written file


def _child(rank, world_size, backend, init_file, rank_fn, payload, out_dir, timeout):
    import torch.distributed as dist
    os.environ.update(CHILD_ENV)  # the forkserver's environment dates from its start
    torch.set_num_threads(1)
    out = os.path.join(out_dir, f"rank{rank}.pt")
    parent = os.getppid()
    try:
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        # The parent's deadline must fire first, so that a hang reads as a timeout, not a gloo error.
        dist.init_process_group(backend, store=dist.FileStore(init_file, world_size), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=2 * timeout + 30))
        value = rank_fn(RankContext(rank, world_size, dist.group.WORLD, device), payload)
        _save(out, {"ok": True, "value": value})
    except BaseException as exc:
        _save(out, {"ok": False, "failure": asdict(failure_from_exception(rank, exc)), "time": time.time()})
        os._exit(1)
    while os.getppid() == parent:  # wait to be terminated; leave if the parent died
        time.sleep(0.2)
    os._exit(0)


def _context():
    # A forkserver is spawned once (clean, single-threaded), imports torch once, then forks each
    # rank in milliseconds: spawning every rank cost ~3 s of torch import each on a 2-core box.
    import torch.multiprocessing as mp
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "autosp_verify.core"])
    return ctx


def run_processes(world_size, rank_fn, payload, timeout, backend):
    ctx = _context()
    tmp = tempfile.mkdtemp(prefix="autosp-verify-")
    init_file = os.path.join(tmp, "store")
    procs = [ctx.Process(target=_child, name=f"autosp-verify-rank{r}",
                         args=(r, world_size, backend, init_file, rank_fn, payload, tmp, timeout))
             for r in range(world_size)]
    try:
        with _child_env():
            for p in procs:
                p.start()
        return _collect(procs, tmp, timeout)
    finally:
        _terminate(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def _collect(procs, out_dir, timeout):
    deadline = time.monotonic() + timeout
    results, pending = [None] * len(procs), set(range(len(procs)))
    while pending:
        failures = []
        for r in sorted(pending):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if os.path.exists(path):
                data = torch.load(path, weights_only=True)
                if data["ok"]:
                    results[r] = data["value"]
                    pending.discard(r)
                else:
                    failures.append((data["time"], RankFailure(**data["failure"])))
            elif not procs[r].is_alive():
                failures.append((float("inf"), RankFailure(
                    r, "error", f"rank {r}: process exited with code {procs[r].exitcode} before reporting "
                    "(crashed or killed)")))
        if failures:
            raise SimulationError(min(failures, key=lambda f: f[0])[1])  # the rank that failed first
        if pending and time.monotonic() > deadline:
            raise SimulationError(RankFailure(min(pending), "timeout", f"timed out after {timeout:g} s: "
                                              f"rank(s) {sorted(pending)} did not finish"))
        if pending:
            time.sleep(_POLL_S)
    return results


def _terminate(procs):
    procs = [p for p in procs if p.pid is not None]  # a failed start leaves some never started
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + 5.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
