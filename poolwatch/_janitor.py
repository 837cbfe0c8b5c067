"""The janitor: poolwatch's one daemon thread, for work that belongs on no one else's.

The hot path only appends wait and use times to lists; collections fold them into
histograms. When collections are rare (a 60 s OTLP interval) or absent (no reader, only
``pools()`` now and then), something must still bound those lists. Checking their length
on every return cost ~70 ns of the ~1 µs budget (benchmarks/), so that check lives here,
once a second, off the application's threads. Periodic tasks too slow for a collection —
the process view's scan of descriptors and TCP connections — run here as well.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from poolwatch._ledger import DRAIN_AT, Ledger
from poolwatch._safe import ErrorLog, garbage_collector_off

INTERVAL = 1.0
"""Seconds between two rounds."""


class Janitor:
    """Folds the pending values of every ledger holding more than ``DRAIN_AT`` of them."""

    def __init__(
        self, ledgers: Callable[[], Iterable[Ledger]], errors: ErrorLog, interval: float = INTERVAL
    ) -> None:
        self._ledgers = ledgers
        self._errors = errors
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._tasks: list[tuple[float, Callable[[], object]]] = []
        self._due: list[float] = []

    def every(self, seconds: float, task: Callable[[], object]) -> None:
        """Also run ``task`` every ``seconds`` (at the first round, then on schedule)."""
        self._tasks.append((seconds, task))
        self._due.append(0.0)

    def start(self) -> None:
        """Start the thread (again, in a forked child: threads do not survive fork)."""
        self._stop = threading.Event()
        self._due = [0.0] * len(self._tasks)
        self._thread = threading.Thread(target=self._run, name="poolwatch-janitor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it, at most ``timeout`` seconds (a round under way —
        a fold, a scan of the process's sockets — ends on its own; the thread is a daemon)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(timeout, 0.0))

    @property
    def alive(self) -> bool:
        """Whether the thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def sweep(self) -> int:
        """One round; returns how many ledgers were folded."""
        folded = 0
        for ledger in self._ledgers():
            if ledger.pending > DRAIN_AT:
                ledger.drain()
                folded += 1
        return folded

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with garbage_collector_off():  # the application's finalizers stay on its threads
                self._round()

    def _round(self) -> None:
        try:
            self.sweep()
        except Exception as error:  # never let the thread die silently
            self._errors.report("janitor", error)
        now = time.monotonic()
        for i, (seconds, task) in enumerate(self._tasks):
            if now >= self._due[i]:
                self._due[i] = now + seconds
                try:
                    task()
                except Exception as error:
                    self._errors.report("janitor task", error)
