"""P real processes (spawn), one rank each, over a FileStore: shared by the gloo and nccl simulators.

Results come back through files in a private temporary folder (``rank{r}.pt``: the result, or a
failure with the time it happened so the parent can name the rank that failed first). A child
that finished waits to be terminated rather than exiting, so it never tears down a connection a
slower peer still reads from; the parent terminates every child when it has all results, on the
first failure, or at the timeout.

Collectives: every child keeps torch's flight recorder on (its last collectives, with shapes and
whether each completed) and a thread that writes it to ``rank{r}.collectives.json`` when the
parent asks (``collectives.request``). The parent asks twice a second while it waits: ranks stuck
in the same collective with different kinds, dtypes or shapes end the run at once with a
"collective mismatch"; at the timeout it names the collective the waiting ranks are in and the
ranks that never joined it.

A child that dies without reporting (a C++ abort: gloo aborts on a collective whose sizes do not
match) leaves a faulthandler dump (``rank{r}.crash``): the message says where it was. It is the
cause, not the ranks that then lose their connection to it, so it is named first.

Everything the payload names (a model_fn, an impl) is imported again in each child: a module
that only exists in the parent (loaded from a file under a made-up name) is refused before any
process starts.
"""
from __future__ import annotations

import faulthandler
import io
import json
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import types
from contextlib import contextmanager
from dataclasses import asdict
from datetime import timedelta

import torch

from autosp_verify.collective_log import (dump_flight_recorder, find_mismatch, from_flight_recorder, snapshot,
                                          stall_message)
from autosp_verify.simulators.base import RankContext, RankFailure, SimulationError, failure_from_exception

# Several ranks share few cores: one intra-op thread each, no Inductor compile pool per child.
# The flight recorder keeps each rank's last 64 collectives (sizes only; costs nothing measurable).
def _loopback() -> str:
    """The loopback interface's name: gloo ranks listen there only (with the user's
    GLOO_SOCKET_IFNAME=eth0 they listened, unauthenticated, on a public interface)."""
    import socket
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in names if n.startswith("lo")), "lo")


CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1",
             "TORCH_FR_BUFFER_SIZE": "64", "GLOO_SOCKET_IFNAME": _loopback()}
_POLL_S = 0.02
_ASK_EVERY_S = 0.5  # the parent asks for every rank's collectives this often while it waits
_ANSWER_S = 1.0  # and waits this long for the answers when a run ends in a collective
_REQUEST = "collectives.request"


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


def _write_text(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _answer_requests(out_dir, rank, backend):
    """In each child: write this rank's flight record whenever the parent asks for a new one."""
    request, out, answered = os.path.join(out_dir, _REQUEST), os.path.join(out_dir, f"rank{rank}.collectives.json"), 0
    while True:
        time.sleep(0.05)
        try:
            with open(request) as f:
                asked = int(f.read())
        except (OSError, ValueError):
            continue
        if asked > answered:
            answered = asked
            _write_text(out, json.dumps({"n": asked, "trace": dump_flight_recorder(backend)}))


def _child(rank, world_size, backend, init_file, rank_fn, payload, out_dir, timeout):
    import torch.distributed as dist
    os.environ.update(CHILD_ENV)  # the forkserver's environment dates from its start
    torch.set_num_threads(1)
    out = os.path.join(out_dir, f"rank{rank}.pt")
    parent = os.getppid()
    crash_file = open(os.path.join(out_dir, f"rank{rank}.crash"), "w")  # noqa: SIM115 (open until the process ends)
    faulthandler.enable(file=crash_file, all_threads=True)
    threading.Thread(target=_answer_requests, args=(out_dir, rank, backend), name="autosp-verify-collectives",
                     daemon=True).start()
    try:
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        # The parent's deadline must fire first, so that a hang reads as a timeout, not a gloo error.
        dist.init_process_group(backend, store=dist.FileStore(init_file, world_size), rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=2 * timeout + 30))
        # A thread of this process is this rank's already; CUDA's current device is per thread.
        adopt = (lambda: torch.cuda.set_device(device)) if backend == "nccl" else (lambda: None)
        value = rank_fn(RankContext(rank, world_size, dist.group.WORLD, device, adopt), payload)
        _save(out, {"ok": True, "value": value})
    except BaseException as exc:
        _save(out, {"ok": False, "failure": asdict(failure_from_exception(rank, exc)), "time": time.time(),
                    "collectives": dump_flight_recorder(backend)})
        os._exit(1)
    while os.getppid() == parent:  # wait to be terminated; leave if the parent died
        time.sleep(0.2)
    os._exit(0)


def _context():
    # A forkserver is spawned once (clean, single-threaded), imports torch once, then forks each
    # rank in milliseconds: spawning every rank cost ~3 s of torch import each on a 2-core box.
    # autosp too (~1.5 s per child otherwise): a rank's probes and the autosp impls import it.
    import torch.multiprocessing as mp
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "autosp_verify.core", "autosp"])
    return ctx


def _importable(module: str) -> bool:
    """Whether a fresh process finds ``module`` by name (sys.modules aside: the parent's own)."""
    if module == "__main__":  # multiprocessing runs the main script again, when there is one
        return getattr(sys.modules.get("__main__"), "__file__", None) is not None
    top = module.partition(".")[0]
    if top in sys.builtin_module_names:
        return True
    for finder in sys.meta_path:
        try:
            if finder.find_spec(top, None) is not None:
                return True
        except (ImportError, AttributeError, TypeError, ValueError):
            pass
    return False


def check_importable(payload, simulator: str) -> None:
    """Refuse, before any process starts, a payload naming functions or classes that a child
    could not import (it would die unpickling its arguments, before it can report anything)."""
    missing = {}

    class Recorder(pickle.Pickler):
        def reducer_override(self, obj):
            if isinstance(obj, (types.FunctionType, type)):
                module = getattr(obj, "__module__", None)
                if module and not _importable(module):
                    missing.setdefault(module, obj.__qualname__)
            return NotImplemented

    Recorder(io.BytesIO()).dump(payload)
    if missing:
        module, name = next(iter(missing.items()))
        where = getattr(sys.modules.get(module), "__file__", None)
        raise ValueError(f"the {simulator} simulator rebuilds the case in a fresh process for every rank, which "
                         f"cannot import {name} from module {module!r}" + (f" (loaded from {where})" if where else "")
                         + ": pass the model file path (verify_file(path, ...) or the command line), not functions "
                         "of a module loaded at run time")


def run_processes(world_size, rank_fn, payload, timeout, backend):
    check_importable((rank_fn, payload), backend)
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


_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')
_DISTRIBUTED = f"{os.sep}torch{os.sep}distributed{os.sep}"
_LOST_PEER = re.compile(r"connection (reset|closed) by peer|broken pipe|remote worker", re.IGNORECASE)


def _crash_site(out_dir, rank) -> str:
    """Where a child that died was, from its faulthandler dump: the torch.distributed call one of
    its threads was inside, and the caller; '' when it was in none (or left no dump)."""
    try:
        with open(os.path.join(out_dir, f"rank{rank}.crash")) as f:
            text = f.read()
    except OSError:
        return ""
    for block in text.split("\n\n"):  # one block per thread, most recent call first
        frames = _FRAME.findall(block)
        inside = 0
        while inside < len(frames) and _DISTRIBUTED in frames[inside][0]:
            inside += 1
        apis = [fn for path, _, fn in frames[:inside]
                if path.endswith(("distributed_c10d.py", "_functional_collectives.py"))]
        if apis:
            caller = frames[inside] if inside < len(frames) else None
            where = f" (called at {os.path.basename(caller[0])}:{caller[1]} in {caller[2]})" if caller else ""
            return f", inside torch.distributed.{apis[-1]}{where}"
    return ""


def _died(proc, out_dir, rank) -> RankFailure:
    code = proc.exitcode
    how = f"{code}" + (f" ({signal.Signals(-code).name})" if code is not None and -code in signal.valid_signals()
                       else "")
    return RankFailure(rank, "error", f"rank {rank}: process exited with code {how} before reporting (crashed or "
                                      f"killed){_crash_site(out_dir, rank)}")


class _Collectives:
    """The parent's view of every rank's collectives: flight records it asks the children for."""

    def __init__(self, out_dir, procs):
        self.out_dir, self.procs = out_dir, procs
        self.asked, self.asked_at = 0, time.monotonic()
        self.answered, self.states = {}, {}

    def ask(self):
        self.asked, self.asked_at = self.asked + 1, time.monotonic()
        _write_text(os.path.join(self.out_dir, _REQUEST), str(self.asked))

    def read(self):
        for r in range(len(self.procs)):
            try:
                with open(os.path.join(self.out_dir, f"rank{r}.collectives.json")) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                continue
            if data["n"] > self.answered.get(r, 0):
                self.answered[r], self.states[r] = data["n"], from_flight_recorder(r, data["trace"])

    def poll(self, pending):
        """While waiting: ask now and then; a mismatch among ranks stuck in one collective, or None."""
        self.read()
        if time.monotonic() - self.asked_at >= _ASK_EVERY_S:
            self.ask()
        if find_mismatch(self.states) is None:
            return None
        self.settle(sorted(pending))  # so that the message lists every rank
        return find_mismatch(self.states)

    def settle(self, ranks):
        """Ask once more and give the live ones among ``ranks`` a moment to answer."""
        self.ask()
        deadline = time.monotonic() + _ANSWER_S
        while time.monotonic() < deadline:
            self.read()
            if all(self.answered.get(r, 0) >= self.asked or not self.procs[r].is_alive() for r in ranks):
                return
            time.sleep(_POLL_S)

    def mismatch_failure(self, found, cause=""):
        message, ranks = found
        return RankFailure(ranks[0], "error", message, f"{cause}\n{snapshot(self.states)}".strip())

    def explain(self, failure, record, pending):
        """A rank's failure; a collective mismatch instead when it failed inside a collective that
        the others entered differently."""
        own = from_flight_recorder(failure.rank, record) if failure.rank is not None else None
        if own is not None:
            self.states[failure.rank] = own
        if own is not None and own.current is not None:
            self.settle(sorted(pending - {failure.rank}))
            self.states[failure.rank] = own
            found = find_mismatch(self.states)
            if found:
                return self.mismatch_failure(found, f"{failure.message}\n{failure.detail}")
        if self.states:
            failure.detail = f"{failure.detail}\ncollectives when the run ended:\n{snapshot(self.states)}"
        return failure

    def timeout(self, timeout, pending):
        self.settle(sorted(pending))
        message, rank = stall_message({r: self.states.get(r) for r in range(len(self.procs))}, pending,
                                      len(self.procs))
        return RankFailure(rank, "timeout", f"timed out after {timeout:g} s: {message}", snapshot(self.states))


def _root_cause(failure, record, procs, out_dir, pending):
    """(failure, its flight record): for a rank that lost its connection to a peer, the peer that
    died without reporting, if one did (its death is seen a moment after the first rank's error)."""
    if not _LOST_PEER.search(failure.message):
        return failure, record
    deadline = time.monotonic() + 2.0
    while True:
        dead = [r for r in sorted(pending) if r != failure.rank and not procs[r].is_alive()
                and not os.path.exists(os.path.join(out_dir, f"rank{r}.pt"))]
        if dead or time.monotonic() > deadline:
            break
        time.sleep(_POLL_S)
    if not dead:
        return failure, record
    cause = _died(procs[dead[0]], out_dir, dead[0])
    own = from_flight_recorder(failure.rank, record)
    call = None if own is None else own.current or own.last  # the failed call is retired, or about to be
    cause.message += f"; rank {failure.rank} lost its connection to it" + (f" in {call.describe()}" if call else "")
    cause.detail = f"{failure.message}\n{failure.detail}"
    return cause, None


def _collect(procs, out_dir, timeout):
    deadline = time.monotonic() + timeout
    results, pending = [None] * len(procs), set(range(len(procs)))
    collectives = _Collectives(out_dir, procs)
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
                    failures.append((data["time"], RankFailure(**data["failure"]), data.get("collectives")))
            elif not procs[r].is_alive():
                failures.append((float("inf"), _died(procs[r], out_dir, r), None))
        if failures:
            _, failure, record = min(failures, key=lambda f: f[0])  # the rank that failed first
            failure, record = _root_cause(failure, record, procs, out_dir, pending)
            raise SimulationError(collectives.explain(failure, record, pending))
        if pending and time.monotonic() > deadline:
            raise SimulationError(collectives.timeout(timeout, pending))
        if pending:
            found = collectives.poll(pending)
            if found:
                raise SimulationError(collectives.mismatch_failure(found))
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
