"""Progress shows as a run goes: a line per case as it finishes, on a pipe (CI logs: plain lines,
nothing rewritten) and on a terminal (a live status line besides); --quiet shows none."""
import contextlib
import io
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
    from autosp_verify.cli import main  # --quiet in this process: a second child would cost its imports
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([*ARGS[3:], "--quiet"])
    assert status == 0 and "case 1/2" not in err.getvalue() and "verdict: pass" in out.getvalue()


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


def test_the_status_line_says_what_the_case_is_doing():
    """On a terminal the live line names each phase: the reference, the ranks, the comparison, and
    for a failing case the search for the first divergence."""
    import io

    from autosp_verify.progress import Progress
    from autosp_verify.run import verify_file

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    progress = Progress(1, stream=screen)
    with progress.case("P=2 S=8") as phase:
        verify_file(os.path.join(HERE, "tiny_model.py"), impl=os.path.join(HERE, "ulysses_impls.py") + ":per_rank_mean",
                    world_size=2, seq_len=8, steps=1, phase=phase)
    shown = screen.getvalue()
    for text in ("the one-device reference", "compiling and running 2 ranks (threaded)", "comparing with one device",
                 "locating the first divergence"):
        assert f"case 1/1 P=2 S=8: {text}" in shown, (text, shown[-2000:])
    silent = io.StringIO()  # a pipe: nothing rewritten, no phases
    with Progress(1, stream=silent).case("P=2 S=8") as phase:
        phase("comparing with one device")
    assert silent.getvalue() == ""
