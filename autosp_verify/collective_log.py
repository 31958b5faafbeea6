"""Each rank's collectives during a run: what a rank that hangs waits in, what ranks disagree about.

One record, :class:`Call` (kind, the shapes and dtype this rank hands in, its group and its
number on that group), from two sources:

* threaded simulator: :func:`record_threaded` wraps the threaded backend's Python methods
  (``ProcessLocalGroup.allreduce``, ``all_to_all_single``, ...) for the duration of one run, so
  every collective a rank thread runs is seen whatever issued it (the impl, a custom op, a
  compiled graph, the backward). When every rank of a group has joined one collective, their
  calls are compared before any data moves: a different kind or dtype, or different shapes where
  they must agree, raises :class:`CollectiveMismatch` (instead of the backend's own confusing
  error, or a silently promoted result), and so does a backend failure inside the collective.
* process simulators: torch's flight recorder (``TORCH_FR_BUFFER_SIZE``) keeps each process's
  recent collectives; :func:`from_flight_recorder` reads a dump of it.

:func:`mismatch_message` and :func:`stall_message` turn per-rank states into one line.
A TorchDispatchMode would not do: it does not see the threaded backend (Python, no dispatch),
and Dynamo refuses to trace while a non-infra dispatch mode is active.
"""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# Kinds whose every rank must hand in the same shapes. Not so: scatter, gather, point to point, an
# all-to-all of lists or with split sizes (gloo's recorder names every all-to-all "all_to_all").
SAME_SHAPES = {"all_reduce", "all_reduce_coalesced", "broadcast", "all_gather", "all_gather_into_tensor",
               "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_coalesced",
               "barrier", "reduce"}


class CollectiveMismatch(RuntimeError):
    """Ranks entered one collective with different kinds, dtypes or shapes (threaded simulator)."""


@dataclass(frozen=True)
class Call:
    kind: str  # the torch.distributed name: all_reduce, all_to_all_single, all_gather, ...
    shapes: tuple  # the tensors this rank hands in
    dtype: str  # "float64"; "-" without tensors
    group: str = ""  # process-group name
    seq: int = 0  # its number among this rank's collectives on that group, from 1
    split: bool = False  # all_to_all_single with split sizes: shapes may differ across ranks

    def describe(self) -> str:
        shapes = " ".join(str(list(s)) for s in self.shapes)
        return " ".join(p for p in (self.kind, shapes, self.dtype if self.shapes else "") if p)

    def signature(self) -> tuple:
        """What every rank in one collective must agree on."""
        same = self.kind in SAME_SHAPES or (self.kind == "all_to_all_single" and not self.split)
        return self.kind, self.dtype, self.shapes if same else None


@dataclass
class RankCollectives:
    """One rank's collectives: ``current`` is the one it is inside now (None between calls)."""

    rank: int
    current: Call | None = None
    last: Call | None = None  # the last one it completed
    calls: list = field(default_factory=list)  # every call (threaded); the recorder's window (processes)
    seqs: dict = field(default_factory=dict)  # group -> calls so far
    depth: int = 0  # > 0 inside a collective: a backend method calling another is one call

    def call_at(self, group: str, seq: int) -> Call | None:
        """This rank's call number ``seq`` on ``group``, if still on record."""
        return next((c for c in reversed(self.calls) if c.seq == seq and c.group == group), None)

    def state(self) -> str:
        if self.current is not None:
            return f"rank {self.rank}: in {self.current.describe()} (#{self.current.seq} on its group)"
        last = f"last {self.last.describe()} (#{self.last.seq})" if self.last else "no collective yet"
        return f"rank {self.rank}: not in a collective, {last}"


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _listing(calls: dict) -> str:
    """'rank 0 all_reduce [4] float32, ranks 1, 2 all_gather [4] float32': equal calls grouped."""
    groups: dict = {}
    for rank in sorted(calls):
        groups.setdefault(calls[rank].describe(), []).append(rank)
    return ", ".join(f"{_ranks(ranks)} {text}" for text, ranks in groups.items())


def mismatch_message(calls: dict) -> str | None:
    """``calls``: rank -> the Call each rank made in ONE collective. None when they agree."""
    if len({c.signature() for c in calls.values()}) <= 1:
        return None
    return "collective mismatch: " + _listing(calls)


def odd_ranks(calls: dict) -> list:
    """The ranks outside the largest group of agreeing calls (the ones to name first)."""
    groups: dict = {}
    for rank, call in calls.items():
        groups.setdefault(call.signature(), []).append(rank)
    largest = max(groups.values(), key=lambda rs: (len(rs), -min(rs)))
    return sorted(r for r in calls if r not in largest)


def find_mismatch(states: dict) -> tuple[str, list] | None:
    """A collective some rank is inside that another rank ran, or runs, differently (the same
    group and number, another kind, dtype or shapes): (message, the odd ranks). Only collectives
    a rank is still inside count: ranks that got through a mismatch (a backend that does not
    check) have wrong numbers, which the comparison reports."""
    for rank, st in sorted(states.items()):
        if st is None or st.current is None:
            continue
        call, calls = st.current, {rank: st.current}
        for other, other_st in states.items():
            found = None if other == rank or other_st is None else other_st.call_at(call.group, call.seq)
            if found is not None:
                calls[other] = found
        message = mismatch_message(calls) if len(calls) > 1 else None
        if message:
            return message, odd_ranks(calls)
    return None


def stall_message(states: dict, pending, world_size: int) -> tuple[str, int]:
    """Why ranks ``pending`` did not finish, from each rank's collectives: (message, rank to name).
    ``states``: rank -> RankCollectives, or None where nothing could be read."""
    pending = sorted(pending)
    found = find_mismatch(states)
    if found:
        return found[0], found[1][0]
    waiting = {r: states[r].current for r in pending if states.get(r) is not None and states[r].current}
    if not waiting:
        unread = [r for r in pending if states.get(r) is None]
        text = f"{_ranks(pending)} did not finish, none of them inside a collective"
        return text + (f" ({_ranks(unread)} could not be asked)" if unread else ""), pending[0]
    instances: dict = {}
    for rank, call in waiting.items():
        instances.setdefault((call.group, call.seq), {})[rank] = call
    if len(instances) > 1:
        return f"ranks wait in different collectives: {_listing(waiting)}", min(waiting)
    call = next(iter(waiting.values()))
    absent = [r for r in range(world_size) if r not in waiting]
    if not absent:
        verb = "is" if len(waiting) == 1 else "are all"
        return f"{_ranks(waiting)} {verb} waiting in {call.describe()}, which never completed", min(waiting)
    notes = []
    for r in absent:
        st = states.get(r)
        if r not in pending:
            notes.append(f"rank {r} finished its step")
        elif st is None:
            notes.append(f"rank {r} could not be asked")
        elif st.last is None:
            notes.append(f"rank {r} has run no collective")
        else:
            notes.append(f"rank {r} last ran {st.last.describe()}")
    verb = "is" if len(waiting) == 1 else "are"
    return (f"{_ranks(absent)} never joined {call.kind}; {_ranks(waiting)} {verb} waiting in {call.describe()} "
            f"({'; '.join(notes)})"), absent[0]


def snapshot(states: dict) -> str:
    """Every rank's state, one line each: for RankFailure.detail."""
    return "\n".join(st.state() if st is not None else f"rank {r}: could not be asked"
                     for r, st in sorted(states.items()))


def _dtype(tensors) -> str:
    names = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    return "/".join(names) if names else "-"


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


# --- threaded simulator --------------------------------------------------------------------------

# ProcessLocalGroup method -> (kind, index of the argument this rank hands in; None: no tensors).
THREADED_METHODS = {
    "allreduce": ("all_reduce", 0), "allreduce_coalesced": ("all_reduce_coalesced", 0),
    "all_to_all_single": ("all_to_all_single", 1), "alltoall": ("all_to_all", 1),
    "allgather": ("all_gather", 1), "all_gather_single": ("all_gather_into_tensor", 1),
    "all_gather_single_coalesced": ("all_gather_coalesced", 1), "broadcast": ("broadcast", 0),
    "scatter": ("scatter", 0), "gather": ("gather", 1), "reduce_scatter": ("reduce_scatter", 1),
    "reduce_scatter_single": ("reduce_scatter_tensor", 1),
    "reduce_scatter_single_coalesced": ("reduce_scatter_coalesced", 1), "barrier": ("barrier", None),
}

_BOUND = threading.local()  # .rank: this thread's RankCollectives, .log: its run's ThreadedLog


class ThreadedLog:
    """The collectives of one threaded run, per rank; ``mismatch`` is set by the first disagreement."""

    def __init__(self, world_size: int):
        self.ranks = {r: RankCollectives(r) for r in range(world_size)}
        self.mismatch: tuple[str, list] | None = None  # (message, ranks to name)
        self._lock = threading.Lock()

    def bind(self, rank: int) -> None:
        """Calls made by this thread from now on are rank ``rank``'s."""
        _BOUND.rank, _BOUND.log = self.ranks[rank], self

    def fail(self, message: str, ranks: list) -> None:
        with self._lock:
            if self.mismatch is None:
                self.mismatch = (message, ranks)


def _threaded_call(name, pg, args, kwargs, st) -> Call:
    kind, index = THREADED_METHODS[name]
    tensors = [] if index is None or index >= len(args) else list(_tensors(args[index]))
    split = name == "all_to_all_single" and any(a is not None and len(a) for a in args[2:4])
    try:
        group = str(pg.pg_name)
    except (KeyError, TypeError, AttributeError):  # a group of an earlier world: name it by its object
        group = f"pg@{id(pg):x}"
    seq = st.seqs[group] = st.seqs.get(group, 0) + 1
    return Call(kind, tuple(tuple(t.shape) for t in tensors), _dtype(tensors), group, seq, bool(split))


def _wrap_method(name, original):
    def recorded(pg, *args, **kwargs):
        st = getattr(_BOUND, "rank", None)
        if st is None or st.depth:  # not a rank of a recorded run, or called by another method
            return original(pg, *args, **kwargs)
        call = _threaded_call(name, pg, args, kwargs, st)
        st.current, st.depth = call, 1
        st.calls.append(call)
        try:
            result = original(pg, *args, **kwargs)
        finally:
            st.depth = 0  # on failure, ``current`` stays: what the rank was inside when it stopped
        st.current, st.last = None, call
        return result
    recorded.__wrapped__ = original
    return recorded


class _Checked:
    """A threaded collective's work, run only once every rank's call agrees (on the rank-0 thread)."""

    def __init__(self, inner, coll, log):
        self.inner, self.coll, self.log = inner, coll, log

    def work(self, data):
        calls = dict(self.coll._autosp_calls.values())  # global rank -> its call
        message = mismatch_message(calls) if len(calls) == len(data) else None
        if message:
            self.log.fail(message, odd_ranks(calls))
            raise CollectiveMismatch(message)
        try:
            return self.inner.work(data)
        except Exception as exc:
            message = f"collective failed: {_listing(calls)}: {type(exc).__name__}: {exc}"
            self.log.fail(message, sorted(calls))
            raise CollectiveMismatch(message) from exc


def _wrap_join(original):
    def join(coll, rank, data):
        st, log = getattr(_BOUND, "rank", None), getattr(_BOUND, "log", None)
        if st is not None and st.current is not None:
            with coll._start_cond:
                if "_autosp_calls" not in coll.__dict__:
                    coll._autosp_calls = {}
                    coll._collective = _Checked(coll._collective, coll, log)
                coll._autosp_calls[rank] = (st.rank, st.current)
        return original(coll, rank, data)
    join.__wrapped__ = original
    return join


@contextmanager
def record_threaded(world_size: int):
    """Record the collectives of one threaded run (the caller owns the threaded world meanwhile);
    rank threads call ``log.bind(rank)`` first. The backend is restored on exit."""
    from torch.testing._internal.distributed import multi_threaded_pg as mtpg
    log = ThreadedLog(world_size)
    cls = mtpg.ProcessLocalGroup
    saved = {name: vars(cls)[name] for name in THREADED_METHODS if name in vars(cls)}
    saved_join = vars(mtpg.Collective)["join"]
    for name, method in saved.items():
        setattr(cls, name, _wrap_method(name, method))
    mtpg.Collective.join = _wrap_join(saved_join)
    try:
        yield log
    finally:
        for name, method in saved.items():
            setattr(cls, name, method)
        mtpg.Collective.join = saved_join


# --- process simulators: torch's flight recorder ---------------------------------------------------

_FR_DTYPES = {"Double": "float64", "Float": "float32", "Half": "float16", "BFloat16": "bfloat16", "Long": "int64",
              "Int": "int32", "Short": "int16", "Char": "int8", "Byte": "uint8", "Bool": "bool"}


def dump_flight_recorder(backend: str) -> str | None:
    """This process's flight-recorder entries as JSON text, or None where there is none."""
    c10d = torch._C._distributed_c10d
    dumps = [getattr(c10d, "_dump_nccl_trace_json", None)] if backend == "nccl" else []
    for dump in [*dumps, getattr(c10d, "_dump_fr_trace_json", None)]:
        if dump is None:
            continue
        try:
            return dump(includeCollectives=True, onlyActive=False).decode()
        except (RuntimeError, TypeError, ValueError):
            pass
    return None


def from_flight_recorder(rank: int, text: str | None) -> RankCollectives | None:
    """A rank's state from its flight-recorder dump: ``current`` is the oldest collective that has
    not completed, ``last`` the newest that has."""
    if not text:
        return None
    try:
        entries = json.loads(text).get("entries") or []
    except (ValueError, AttributeError):
        return None
    st = RankCollectives(rank)
    for e in sorted(entries, key=lambda e: e.get("record_id", 0)):
        dtypes = sorted({_FR_DTYPES.get(d, d.lower()) for d in e.get("input_dtypes") or []})
        kind = str(e.get("profiling_name", "?")).rpartition(":")[2]
        group = (e.get("process_group") or [""])[0]
        seq = e.get("p2p_seq_id") if e.get("is_p2p") else e.get("collective_seq_id")
        call = Call(kind, tuple(tuple(s) for s in e.get("input_sizes") or []), "/".join(dtypes) or "-", str(group),
                    int(seq or 0))
        st.calls.append(call)
        if not e.get("retired", True) and st.current is None:
            st.current = call
        elif e.get("retired", True):
            st.last = call
    return st
