"""Structural runs at large P on torch's fake process group: shapes, graph validity, no numerics.

Fake collectives return plausible but wrong values (an all-to-all hands back its input), so a
result from here only says that the step ran, produced well-shaped outputs and gradients, and
issued the same collectives on every rank run. Only rank 0 and the last rank run, one after the
other, in a worker thread (so a hang is bounded) with its own thread-local process-group world
(so nothing leaks into the caller's).

Collectives: when autosp is loaded, each rank's result carries under ``"structural_collectives"``
what that rank issued through autosp's ops, forward and backward (``autosp.collective_counts()``:
count by kind, and the bytes handed to each kind under ``KIND_bytes``), reset before the rank
starts; ``compare.check_structure`` requires every rank run to agree. Collectives an impl issues
without autosp's ops are not seen (the entry is then empty on every rank).
"""
from __future__ import annotations

import queue
import sys
import threading

import torch
import torch.distributed as dist

from autosp_verify.simulators.base import (RankContext, RankFailure, SimulationError, Simulator,
                                           failure_from_exception)
from autosp_verify.simulators.threaded import _RUN_LOCK, _abandon, _threaded_world, dynamo_limits, rank_adopter


COLLECTIVES = "structural_collectives"  # the key in each rank's result dict


def _autosp_counts():
    """autosp's per-thread collective counter, or None when autosp is not loaded (never imported
    just to ask: an impl without autosp runs without it)."""
    module = sys.modules.get("autosp.collectives")
    return None if module is None else module.collective_counts()


def counting_collectives(rank_fn):
    """``rank_fn`` whose result also holds the collectives the rank issued through autosp's ops."""
    def counted(ctx, payload):
        counts = _autosp_counts()
        if counts is not None:
            counts.clear()
        result = rank_fn(ctx, payload)
        counts = _autosp_counts()  # autosp may have been loaded by this rank's impl
        if isinstance(result, dict):
            result[COLLECTIVES] = None if counts is None else dict(counts)
        return result
    return counted


def _run_ranks(ranks, world_size, rank_fn, payload, events, limits, world):
    with torch._dynamo.config.patch(**limits):  # the caller's limits: Dynamo's config is per thread
        _run_each(ranks, world_size, rank_fn, payload, events, world)


def _run_each(ranks, world_size, rank_fn, payload, events, world):
    from torch.testing._internal.distributed.fake_pg import FakeStore
    for rank in ranks:
        try:
            dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
            ctx = RankContext(rank, world_size, dist.group.WORLD, torch.device("cpu"), rank_adopter())
            events.put((rank, None, rank_fn(ctx, payload)))
        except BaseException as exc:
            events.put((rank, failure_from_exception(rank, exc), None))
            return
        finally:
            # A worker abandoned after a hang may get here after its world was uninstalled: then
            # the process group it would destroy is the caller's, not its own. Leave it alone.
            if dist.distributed_c10d._world is world and dist.is_initialized():
                dist.destroy_process_group()


class FakeSimulator(Simulator):
    name = "fake"
    in_process = True
    structural = True

    def ranks_run(self, world_size):
        return sorted({0, world_size - 1})

    def run(self, world_size, rank_fn, payload, timeout):
        ranks = self.ranks_run(world_size)
        results = [None] * world_size
        with _RUN_LOCK, _threaded_world() as world:
            events = queue.Queue()
            worker = threading.Thread(target=_run_ranks, name="autosp-verify-fake", daemon=True,
                                      args=(ranks, world_size, counting_collectives(rank_fn), payload, events,
                                            dynamo_limits(), world))
            worker.start()
            worker.join(timeout)
            alive = worker.is_alive()
            if alive:
                _abandon([worker], hung=True)
        while not events.empty():
            rank, failure, value = events.get()
            if failure is not None:
                raise SimulationError(failure)
            results[rank] = value
        if alive:
            stuck = next(r for r in ranks if results[r] is None)
            raise SimulationError(RankFailure(stuck, "timeout", f"timed out after {timeout:g} s: rank {stuck} did "
                                              "not finish (fake process group)"))
        return results
