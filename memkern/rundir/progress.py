"""Progress of long commands (train, grads, rewind, retrain, localize, demo and the score
builders): a bar on a terminal, one plain line per step everywhere else.

A bar redraws itself with carriage returns, which fill a log file with noise, and a run with
the bar switched off should still say where it is. So a bar (tqdm, on stderr) is drawn only
when ``bar`` is on and both stdout and stderr are terminals; otherwise each
:meth:`Progress.step` prints one line on stdout, flushed, so a batch log gets one line per
epoch or step as it happens. Between milestones that are far apart (a chunk of localization
targets on a large model takes many minutes), a plain log also gets a line of the units done
every ``HEARTBEAT_S`` seconds, so a log never goes quiet for long.

    with Progress(total=steps, desc="train digits", unit="step", bar=progress) as p:
        for ...:
            p.advance()                       # the bar moves; no line
        p.step("epoch 3/30  test 0.947")      # bar: shown beside it; log: one line
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

HEARTBEAT_S = 60.0


def draws_bar(bar: bool) -> bool:
    """Whether progress shows as a bar: asked for, and neither output goes to a file or pipe."""
    return bar and sys.stdout.isatty() and sys.stderr.isatty()


class Progress:
    """``total`` units of work (``initial`` of them already done), named ``desc``.

    ``bar``: draw a bar on a terminal (else plain lines); ``silent``: show nothing
    (the non-reporting ranks of a torchrun launch)."""

    def __init__(self, *, total: int, desc: str, unit: str, initial: int = 0, bar: bool = True,
                 silent: bool = False):
        self.desc = desc
        self.silent = silent
        self.unit = unit
        self.total = total
        self.done = initial
        self._last_line = time.monotonic()
        self._bar = (tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True)
                     if draws_bar(bar) and not silent else None)

    def advance(self, n: int = 1) -> None:
        """``n`` more units done: moves the bar; in a plain log, prints a line only when the
        last one is ``HEARTBEAT_S`` old (``n`` may be 0: still working, nothing finished)."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif not self.silent and time.monotonic() - self._last_line >= HEARTBEAT_S:
            self._print(f"{self.done}/{self.total} {self.unit}s done")

    def step(self, text: str) -> None:
        """A milestone (an epoch, a group, a chunk): beside the bar, or one line of its own."""
        if self.silent:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(text)
        else:
            self._print(text)

    def _print(self, text: str) -> None:
        print(f"{self.desc}: {text}", flush=True)
        self._last_line = time.monotonic()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
