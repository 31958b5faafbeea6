"""Deadlines for work on the calling thread, and what a thread is doing when one passes.

The simulators bound the ranks by ``--timeout``; the one-device reference and an impl's warm-up
run on the calling thread before them, and a hang there would run forever. ``deadline`` raises
``DeadlineExceeded`` in that thread at its next Python bytecode (a loop in Python, or the next
step of a compile); ``doing`` says from a thread's stack whether it is compiling (Dynamo,
AOTAutograd, Inductor) or where in the user's code it is, so a slow compile reads as one.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import sysconfig
import threading

_COMPILING = (os.sep + os.path.join("torch", "_dynamo") + os.sep, os.sep + os.path.join("torch", "_inductor") + os.sep,
              os.sep + os.path.join("torch", "_functorch") + os.sep)
_HERE = os.path.dirname(os.path.abspath(__file__))
_LIBRARY = (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], _HERE + os.sep,
            os.path.join(os.path.dirname(_HERE), "autosp") + os.sep)  # not the user's code


class DeadlineExceeded(BaseException):
    """The calling thread's deadline passed (a BaseException: ``except Exception`` in the code it
    interrupts must not swallow it)."""


def _frames(ident: int | None) -> list:
    frame = sys._current_frames().get(ident) if ident is not None else None
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames


def _in_compile(frames) -> bool:
    return any(any(d in f.f_code.co_filename for d in _COMPILING) for f in frames)


def compiling(ident: int | None) -> bool:
    """Whether the thread ``ident`` is inside torch.compile (Dynamo, AOTAutograd or Inductor)."""
    return _in_compile(_frames(ident))


def doing(ident: int | None) -> str:
    """What the thread ``ident`` is doing: 'compiling (...)' or 'at FILE:LINE in FUNC'."""
    frames = _frames(ident)
    if not frames:
        return "not running"
    user = next((f for f in frames if not f.f_code.co_filename.startswith(_LIBRARY)), None)
    at = f"{user.f_code.co_filename}:{user.f_lineno} in {user.f_code.co_name}" if user else "in library code"
    if _in_compile(frames):
        return f"compiling (torch.compile: Dynamo, AOTAutograd or Inductor), from {at}"
    return f"at {at}"


def _async_raise(ident: int, exc) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc) if exc else None)


@contextlib.contextmanager
def deadline(seconds: float, what: str):
    """Run the block on this thread for at most ``seconds``; past it, DeadlineExceeded names
    ``what`` and what the thread was doing."""
    ident, lock, state = threading.get_ident(), threading.Lock(), {"done": False, "doing": None}

    def fire():
        with lock:
            if not state["done"]:
                state["doing"] = doing(ident)
                _async_raise(ident, DeadlineExceeded)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except DeadlineExceeded:
        raise DeadlineExceeded(f"timed out after {seconds:g} s in {what}: {state['doing']}") from None
    finally:
        timer.cancel()
        with lock:
            state["done"] = True
            if state["doing"] is not None:
                _async_raise(ident, None)  # fired as the block ended: nothing left pending
