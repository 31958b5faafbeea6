"""Progress of a verifier run, on stderr (stdout keeps the table and the verdict).

On a terminal: a live status line for the case running (which of how many, what it is doing:
the one-device reference, compiling and running P ranks, comparing, locating the divergence,
accounting; elapsed time; rich's spinner, rewritten in place) and a line per case as it finishes. Off a terminal (CI logs): only
the line per case as it finishes, nothing that rewrites lines. ``quiet``: neither.
"""
from __future__ import annotations

import contextlib
import sys


class Progress:
    def __init__(self, total: int, quiet: bool = False, stream=None):
        self.total, self.quiet, self.stream = total, quiet, stream or sys.stderr
        self.done = 0
        self.live = not quiet and self.stream.isatty()
        self._console = None
        if self.live:
            from rich.console import Console
            self._console = Console(file=self.stream, highlight=False)

    @contextlib.contextmanager
    def case(self, label: str):
        """Around one case: yields ``phase(text)``, which says what the case is doing now. A live
        status line with it and the elapsed time while the case runs (terminal only)."""
        if not self.live:
            yield lambda text: None
            return
        from rich.progress import Progress as Live, SpinnerColumn, TextColumn, TimeElapsedColumn
        with Live(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=self._console,
                  transient=True) as live:
            prefix = f"case {self.done + 1}/{self.total} {label}: "
            task = live.add_task(prefix + "starting", total=None)
            yield lambda text: live.update(task, description=prefix + text, refresh=True)  # each phase shown

    def finished(self, label: str, status: str, seconds: float) -> None:
        self.done += 1
        if self.quiet:
            return
        line = f"case {self.done}/{self.total} {label}: {status.upper()} ({seconds:.1f} s)"
        if self._console is not None:
            self._console.print(line)
        else:
            print(line, file=self.stream, flush=True)
