"""Failures inside poolwatch are logged once per place, counted, and never raised.

poolwatch runs inside someone else's application: a bug or an unexpected library version
must cost a log line, not a request.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator

logger = logging.getLogger("poolwatch")


@contextlib.contextmanager
def garbage_collector_off() -> Iterator[None]:
    """Run poolwatch's own thread's work with the cyclic garbage collector off.

    A thread that allocates may be the one that crosses the collector's threshold, and then
    the application's finalizers run on it: SQLAlchemy's for a connection garbage-collected
    unreturned, an asyncio object's off its event loop — at moments and on a thread the
    application never arranged. Off while poolwatch's thread works, the next collection
    happens on whichever of the application's own threads allocates next, as without
    poolwatch. (Left as it was if the application turned it off; were the application to
    turn it off during these milliseconds, it would be on again after them.)
    """
    enabled = gc.isenabled()
    if enabled:
        gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class ErrorLog:
    """Counts internal failures by place and logs the first of each place."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def report(self, where: str, error: BaseException) -> None:
        """Record ``error`` raised inside poolwatch at ``where``."""
        with self._lock:
            first = where not in self._counts
            self._counts[where] = self._counts.get(where, 0) + 1
        if first:
            logger.warning(
                "poolwatch: internal error in %s; the application is unaffected and "
                "further errors here are counted, not logged: %s: %s",
                where,
                type(error).__name__,
                error,
                exc_info=error,
            )

    @property
    def counts(self) -> dict[str, int]:
        """Failures so far by place."""
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        """All failures so far."""
        with self._lock:
            return sum(self._counts.values())
