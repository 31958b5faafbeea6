"""The one interface every simulator implements, and the failure types they raise.

A simulator runs ``rank_fn(ctx, payload)`` on ``world_size`` ranks and returns the per-rank
results in rank order::

    run(world_size, rank_fn, payload, timeout) -> list

``rank_fn`` is a module-level (picklable) function, ``payload`` what it needs: an in-memory case
for in-process simulators, a picklable spec for process simulators (``in_process`` says which).
A run never hangs: the first rank to fail ends it, with a :class:`SimulationError` naming that
rank, and so does the timeout. A simulator that cannot run here raises
:class:`SimulatorUnavailable` before starting anything.
"""
from __future__ import annotations

import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional


def _nothing() -> None:
    pass


@dataclass
class RankContext:
    rank: int
    world_size: int
    group: Any  # torch.distributed.ProcessGroup
    device: Any  # torch.device
    adopt: Callable[[], None] = _nothing  # run on another thread: makes it part of this rank

    def on_other_thread(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on a new thread of this rank (what ``adopt`` sets up), its result or its
        exception: CUDA's autograd engine runs a backward on a thread of its own, never on the
        thread that ran the forward, and every simulator runs the backward that way so that
        nothing can rely on sharing the forward's thread."""
        outcome = {}

        def body():
            try:
                self.adopt()
                outcome["value"] = fn()
            except BaseException as exc:  # SystemExit too: the threaded group stops ranks with it
                outcome["error"] = exc
        thread = threading.Thread(target=body, name=f"autosp-verify-rank{self.rank}-backward", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.05)  # short waits: an exception raised in this rank's thread still lands
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]


@dataclass
class RankFailure:
    """What went wrong on one rank; plain data so it crosses process boundaries."""

    rank: Optional[int]
    kind: str  # "error" | "unsupported" | "timeout"
    message: str
    detail: str = ""  # traceback, for --verbose and debugging; never in the one-line report

    def __str__(self):
        return self.message


class RankError(Exception):
    """Raised by a rank_fn to hand the simulator an already classified failure."""

    def __init__(self, failure: RankFailure):
        super().__init__(failure.message)
        self.failure = failure

    def __reduce__(self):
        return (RankError, (self.failure,))


class SimulationError(Exception):
    """A run ended without a result from every rank."""

    def __init__(self, failure: RankFailure):
        super().__init__(failure.message)
        self.failure = failure


class SimulatorUnavailable(Exception):
    """This simulator cannot run the case on this machine (e.g. too few GPUs)."""


def failure_from_exception(rank: Optional[int], exc: BaseException) -> RankFailure:
    if isinstance(exc, RankError):
        return exc.failure
    if isinstance(exc, SystemExit):
        # The threaded process group exits waiting ranks with SystemExit once another rank failed.
        message = f"rank {rank}: stopped because another rank failed"
    else:
        message = f"rank {rank}: {type(exc).__name__}: {exc}"
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return RankFailure(rank, "error", message, detail)


class Simulator:
    name = "base"
    in_process = True  # payload is an in-memory case (True) or a picklable spec (False)
    structural = False  # results carry shapes only, never numerics

    def ranks_run(self, world_size: int) -> list:
        """The ranks whose results this simulator returns (the others are None)."""
        return list(range(world_size))

    def run(self, world_size: int, rank_fn: Callable, payload: Any, timeout: float) -> list:
        raise NotImplementedError
