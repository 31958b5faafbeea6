"""The ``autosp-verify`` command: its exit status comes only from a written verdict.

The verifier runs model files and impls it does not control: one can raise ``SystemExit(0)`` at
import, call ``os._exit(0)`` on one rank, leave a non-daemon thread running, or be stopped by a
SIGTERM (a CI cancel, ``timeout``, Slurm) while gloo ranks, the forkserver and the temp folder
with the weights live on. So the command is a small parent (no torch import) that runs the
verifier as a child process in a session of its own:

- the child writes its exit status to the verdict file once it has one, then leaves at once
  (``os._exit``: a thread an impl left behind cannot keep it alive);
- no verdict file means no verdict: the parent says how the child ended and exits 1, never 0;
- SIGTERM, SIGINT and SIGHUP to the parent end the child's whole process group (ranks, forkserver,
  resource tracker), and the temp folder (the child's TMPDIR) is removed in every case;
- the child dies with the parent (``PR_SET_PDEATHSIG`` on Linux) if the parent is killed outright.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

VERDICT_ENV = "AUTOSP_VERIFY_VERDICT"
EXIT_NO_VERDICT = 1  # the exit status table's "an impl crash"
GRACE_SECONDS = 5.0


def write_verdict(code: int) -> None:
    """In the child: record ``code`` as the run's verdict, flush, and leave now."""
    path = os.environ.get(VERDICT_ENV)
    sys.stdout.flush()
    sys.stderr.flush()
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(str(int(code)))
        os.replace(path + ".tmp", path)  # never half written
    os._exit(int(code))


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the signal handlers below still end the child


def _end_group(pgid: int, first=signal.SIGTERM) -> None:
    """``first`` to the child's process group, SIGKILL to what is left after a grace period."""
    try:
        os.killpg(pgid, first)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + GRACE_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _record_incomplete(argv: list, why: str) -> None:
    """``--json PATH`` given: the report says the run is incomplete (a CI artifact must not be
    missing, or left from an earlier run)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--json")
    path = parser.parse_known_args(argv)[0].json
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"verdict": "error", "incomplete": True, "error": why, "cases": []}, f)
                f.write("\n")
        except OSError:
            pass


def supervise(argv: list) -> int:
    folder = tempfile.mkdtemp(prefix="autosp-verify-run-")
    verdict = os.path.join(folder, "verdict")
    env = dict(os.environ, **{VERDICT_ENV: verdict, "TMPDIR": folder})
    child = subprocess.Popen([sys.executable, "-m", "autosp_verify.supervise", *argv], env=env,
                             start_new_session=True, preexec_fn=_die_with_parent)
    stopped = []

    def stop(signum, frame):
        stopped.append(signum)
        _end_group(child.pid, signal.SIGTERM if signum != signal.SIGINT else signal.SIGINT)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        returncode = child.wait()
        _end_group(child.pid, signal.SIGKILL)  # whatever the child left behind (ranks, forkserver)
        code = None
        if os.path.exists(verdict):
            with open(verdict) as f:
                code = int(f.read())
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(folder, ignore_errors=True)
    if stopped:
        name = signal.Signals(stopped[0]).name
        print(f"autosp-verify: stopped by {name}; every rank and temp file removed", file=sys.stderr)
        return 128 + stopped[0]
    if code is None:
        why = (f"the run ended without a verdict ({_how_it_ended(returncode)}): something in the model file or "
               "the impl ended the process (SystemExit, os._exit, a signal)")
        print(f"autosp-verify: {why}. No result: failing.", file=sys.stderr)
        _record_incomplete(argv, why)
        return EXIT_NO_VERDICT
    return code


def main(argv=None) -> int:
    """The console entry point: supervise the verifier (unless already the supervised child)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if os.environ.get(VERDICT_ENV):
        from autosp_verify.cli import main as verifier_main
        write_verdict(verifier_main(argv))
    return supervise(argv)


if __name__ == "__main__":
    sys.exit(main())
