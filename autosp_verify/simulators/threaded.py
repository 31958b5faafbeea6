"""P ranks as P threads on torch's threaded process group: exact collectives, ~ms to start.

Pitfalls this module handles (see the field notes): the C++ group-name registry is process-wide
unless thread isolation is on; ProcessLocalGroup keeps class-level state (pending collectives
keyed by group name, a terminate flag) that must be reset before each run, and every run gets
its own group name so that a rank left over from an earlier run can never join this run's
collectives. A thread cannot be killed: when a rank fails we wake every rank blocked in a
collective (``exception_handle``) and let the rest run out as daemon threads; when a run times
out we also raise SystemExit asynchronously in the ranks still alive (it fires at their next
bytecode, which ends Python-level hangs). Before the next run starts, leftovers of earlier runs
are stopped the same way and waited for (an impl's process-global state, e.g. DeepSpeed's group
registry, must not change under the new run), except that a rank inside torch.compile is first
left to finish (a SystemExit landing in a compile can abort the process); at exit too, so the
interpreter does not shut down under a thread still inside C++ (e.g. a compile).

Every collective a rank runs is recorded for the run (``collective_log.record_threaded``): ranks
that enter one collective with different kinds, dtypes or shapes fail at once with a
"collective mismatch" naming each rank's call, and a timeout names the collective the waiting
ranks are in and the ranks that never joined it.
"""
from __future__ import annotations

import atexit
import ctypes
import itertools
import queue
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from autosp_verify.deadline import compiling, deadline, doing
from autosp_verify.collective_log import record_threaded, snapshot, stall_message
from autosp_verify.simulators.base import (RankContext, RankFailure, SimulationError, Simulator,
                                           failure_from_exception)

_RUN_LOCK = threading.Lock()  # the threaded world is process-global: one run at a time
_WAKE_GRACE_S, _ABANDON_GRACE_S, _SETTLE_S, _EXIT_GRACE_S = 0.5, 2.0, 10.0, 10.0
_RUN_IDS = itertools.count(1000)  # a fresh process-group name per run
_LEFTOVER = []  # rank threads of failed runs still running impl code when their run ended
_STUCK = []  # threads already sent SystemExit that have not died (blocked in C): never waited for again


def _mtpg():
    # Imported lazily: importing it registers the "threaded" backend.
    from torch.testing._internal.distributed import multi_threaded_pg
    return multi_threaded_pg


@contextmanager
def _threaded_world():
    mtpg = _mtpg()
    _settle_leftovers()
    mtpg.ProcessLocalGroup.reset()  # clears what an abandoned earlier run left behind
    world = mtpg._install_threaded_pg()
    isolation = getattr(torch._C._distributed_c10d, "_set_thread_isolation_mode", None)
    if isolation:
        isolation(True)  # per-thread group-name registry: every rank registers the same name
    try:
        yield world
    finally:
        if isolation:
            isolation(False)
        mtpg._uninstall_threaded_pg()


def dynamo_limits() -> dict:
    """The calling thread's Dynamo recompile limits. Dynamo's config is per thread: a rank thread
    would start from the defaults, whatever its caller set (the verifier lifts the limits)."""
    config = torch._dynamo.config
    return {"recompile_limit": config.recompile_limit,
            "accumulated_recompile_limit": config.accumulated_recompile_limit}


def rank_adopter(log=None, rank: int | None = None):
    """Called on a rank's thread: a function that makes another thread part of the same rank, as
    threads of one process are: the same threaded world (groups, ranks), the same names in c10d's
    per-thread group registry, the same Dynamo limits, the rank's collective log."""
    mtpg = _mtpg()
    data, limits = mtpg.ThreadLocalWorld._world.world, dynamo_limits()

    def adopt():
        mtpg.ThreadLocalWorld._world.world = data
        for group, name in list(data.pg_names.items()):
            torch._C._distributed_c10d._register_process_group(name, group)
        for key, value in limits.items():
            setattr(torch._dynamo.config, key, value)
        if log is not None:
            log.bind(rank)
    return adopt


def _rank_thread(*args, limits):
    try:
        with torch._dynamo.config.patch(**limits):
            _rank_body(*args)
    except BaseException:  # an abandoned rank hit by the asynchronous SystemExit: nothing to report
        pass


def _rank_body(rank, world_size, store, rank_fn, payload, events, world, timeout, run_id, log):
    try:
        log.bind(rank)
        world.group_count = run_id  # the default group is named after the run, not "0" every time
        dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store,
                                timeout=timedelta(seconds=timeout))
        ctx = RankContext(rank, world_size, dist.group.WORLD, torch.device("cpu"), rank_adopter(log, rank))
        events.put((rank, None, rank_fn(ctx, payload)))
    except BaseException as exc:  # SystemExit included: the threaded pg uses it to stop ranks
        events.put((rank, failure_from_exception(rank, exc), None))
        _mtpg().ProcessLocalGroup.exception_handle(exc)  # wake ranks blocked in collectives
    finally:
        # An abandoned thread may get here after the world was uninstalled: leave it alone then.
        if dist.distributed_c10d._world is world and dist.is_initialized():
            dist.destroy_process_group()


def _timeout_failure(timeout, pending, log, threads):
    message, rank = stall_message(log.ranks, pending, len(log.ranks))
    outside = [r for r in sorted(pending) if log.ranks.get(r) is None or not log.ranks[r].current]
    message += "".join(f"; rank {r} {doing(threads[r].ident)}" for r in outside)  # not in a collective
    return RankFailure(rank, "timeout", f"timed out after {timeout:g} s: {message}", snapshot(log.ranks))


def _explained(failure, log):
    """A rank's failure; a collective mismatch instead when that is what stopped the run."""
    if log.mismatch is not None:
        message, ranks = log.mismatch
        return RankFailure(ranks[0] if ranks else failure.rank, "error", message,
                           f"{failure.message}\n{failure.detail}\n{snapshot(log.ranks)}")
    return RankFailure(failure.rank, failure.kind, failure.message,
                       f"{failure.detail}\ncollectives when the run ended:\n{snapshot(log.ranks)}")


def _abandon(threads, hung: bool):
    _mtpg().ProcessLocalGroup.exception_handle(None)  # ranks waiting in a collective exit on their own
    _join(threads, _WAKE_GRACE_S)
    if hung:
        _raise_in(threads)
        _join(threads, _ABANDON_GRACE_S)
    (_STUCK if hung else _LEFTOVER).extend(t for t in threads if t.is_alive())


def _raise_in(threads):
    for t in threads:
        if t.is_alive() and t.ident is not None:
            # Fires at the thread's next bytecode: stops Python-level hangs and busy loops.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(SystemExit))


def _stop(threads, seconds):
    """A rank still compiling is left to finish first (for up to ``seconds``): an asynchronous
    SystemExit landing inside a compile (Dynamo's compile lock, its C-level frame state) can abort
    the whole process, and a rank compiling when its run failed (DeepSpeed refusing on every rank)
    ends in seconds. The others are stopped at once."""
    _mtpg().ProcessLocalGroup.exception_handle(None)  # the terminate flag may have been reset since
    _raise_in([t for t in threads if not compiling(t.ident)])
    _join([t for t in threads if t.is_alive() and compiling(t.ident)], seconds)
    _raise_in(threads)
    _join(threads, seconds)


def _settle_leftovers():
    alive = [t for t in _LEFTOVER if t.is_alive()]
    _LEFTOVER.clear()
    if alive:
        _stop(alive, _SETTLE_S)
        _STUCK.extend(t for t in alive if t.is_alive())


@atexit.register
def _stop_leftovers_at_exit():
    alive = [t for t in _LEFTOVER + _STUCK if t.is_alive()]
    if alive:
        _stop(alive, _EXIT_GRACE_S)


def _join(threads, seconds):
    deadline = time.monotonic() + seconds
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


class ThreadedSimulator(Simulator):
    name = "threaded"
    in_process = True

    def run(self, world_size, rank_fn, payload, timeout):
        warm_up = getattr(rank_fn, "warm_up", None)
        with _RUN_LOCK:
            if warm_up is not None:  # on this thread, before any rank: compile once, not per rank
                with deadline(timeout, "the impl's warm-up (compiling once on this thread before the ranks start)"):
                    warm_up(payload, world_size)
            return self._run(world_size, rank_fn, payload, timeout)

    def _run(self, world_size, rank_fn, payload, timeout):
        with _threaded_world() as world, record_threaded(world_size) as log:
            store = dist.HashStore()
            events = queue.Queue()
            run_id = next(_RUN_IDS)
            threads = [threading.Thread(target=_rank_thread, name=f"autosp-verify-run{run_id}-rank{r}", daemon=True,
                                        args=(r, world_size, store, rank_fn, payload, events, world, timeout, run_id,
                                              log), kwargs={"limits": dynamo_limits()})
                       for r in range(world_size)]
            for t in threads:
                t.start()
            try:
                return _collect(events, world_size, timeout, log, threads)
            except SimulationError as exc:
                _abandon(threads, hung=exc.failure.kind == "timeout")
                raise


def _collect(events, world_size, timeout, log, threads):
    deadline = time.monotonic() + timeout
    results, pending = [None] * world_size, set(range(world_size))
    while pending:
        try:
            rank, failure, value = events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise SimulationError(_timeout_failure(timeout, pending, log, threads)) from None
        if failure is not None:
            raise SimulationError(_explained(failure, log))
        results[rank] = value
        pending.discard(rank)
    return results
