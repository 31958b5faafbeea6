"""Progress shows as a run goes: a line per case as it finishes, on a pipe (CI logs: plain lines,
nothing rewritten) and on a terminal (a live status line besides); --quiet shows none."""
import os
import pty
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
ARGS = [sys.executable, "-m", "autosp_verify.cli", os.path.join(HERE, "tiny_model.py"), "--impl", "autosp-eager",
        "--world-size", "2", "--seq-len", "8,9", "--steps", "1"]


def test_a_line_per_case_arrives_before_the_run_ends_on_a_pipe():
    proc = subprocess.Popen(ARGS, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    still_running = proc.poll() is None  # the first case is done, the second is not
    rest, _ = proc.communicate(timeout=300)
    assert first.startswith("case 1/2 P=2 S=8: PASS ("), first
    assert still_running
    assert "\x1b" not in first and "\r" not in first  # nothing that rewrites lines in a log
    assert proc.returncode == 0


def test_a_terminal_gets_the_lines_too_and_quiet_gets_none():
    main, child = pty.openpty()
    proc = subprocess.Popen(ARGS, cwd=ROOT, stdout=subprocess.PIPE, stderr=child, stdin=child)
    os.close(child)
    seen, deadline = b"", time.monotonic() + 300
    while b"case 2/2" not in seen and time.monotonic() < deadline:
        try:
            seen += os.read(main, 4096)
        except OSError:
            break
    proc.communicate(timeout=300)
    os.close(main)
    assert b"case 1/2 P=2 S=8: PASS" in seen and b"case 2/2" in seen, seen[-500:]
    quiet = subprocess.run([*ARGS, "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and "case 1/2" not in quiet.stderr and "verdict: pass" in quiet.stdout


def test_explore_reports_each_case_tried_and_the_shrink():
    from autosp_verify.cli import main
    import io
    import contextlib
    err = io.StringIO()
    impl = os.path.join(HERE, "explore_impls.py") + ":padded_labels_zero"
    with contextlib.redirect_stderr(err):
        status = main([os.path.join(HERE, "tiny_model.py"), "--impl", impl, "--explore", "6", "--seed", "0",
                       "--world-size", "2", "--seq-len", "8"])
    lines = [l for l in err.getvalue().splitlines() if l.startswith("explore case ")]
    assert status == 1 and lines, err.getvalue()
    assert lines[0].startswith("explore case 1: P=2 ") and "\x1b" not in err.getvalue()
    assert any("(shrinking;" in l for l in lines) or any("(searching;" in l for l in lines)
