"""The leak log: one WARNING per leak on the ``poolwatch`` logger, with the borrower's stack
when it was captured; an INFO line when a leaked checkout comes back."""

from __future__ import annotations

from poolwatch._config import Settings
from poolwatch._ledger import LeakReport, render_stack
from poolwatch._safe import logger


class LeakLog:
    """Logs the leak reports a collection round's upkeep hands over (``Ledger.sweep``)."""

    def __init__(self, settings: Settings) -> None:
        self._threshold = settings.leak_threshold
        self._stacks = settings.leak_stacks

    def log(self, name: str, kind: str, report: LeakReport) -> None:
        """Log one report about pool series ``name`` of ``kind``."""
        pool = f"{name!r} ({kind})"
        if report.returned and not report.counted:
            logger.info(
                "poolwatch: the leaked connection of pool %s came back after %.1f s",
                pool,
                report.held,
            )
            return
        if report.collected:
            when = "was garbage-collected without being returned, after"
        elif report.returned:
            when = "was held for"
        else:
            when = "has been checked out for"
        if report.stack:
            where = "checked out at:\n" + render_stack(report.stack)
        elif self._stacks == "auto":
            where = (
                "the borrower's stack was not captured; it is from now on for this pool's "
                "checkouts (leak_stacks='auto')"
            )
        else:
            where = "the borrower's stack is not captured (leak_stacks='off')"
        past = "" if report.collected else f", past the leak threshold of {self._threshold:g} s"
        logger.warning(
            "poolwatch: a connection of pool %s %s %.1f s%s; %s",
            pool,
            when,
            report.held,
            past,
            where.rstrip(),
        )
