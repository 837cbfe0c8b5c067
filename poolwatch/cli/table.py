"""The pool table ``poolwatch demo`` prints every second: one line per pool series, from
``poolwatch.pools()``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from poolwatch._models import PoolSnapshot


def _bar(used: int, limit: int | None, width: int = 10) -> str:
    if not limit:
        return " " * width
    filled = min(width, round(width * used / limit))
    return "#" * filled + "." * (width - filled)


COLUMNS = (
    "POOL",
    "KIND",
    "USED/MAX",
    "UTIL",
    "IDLE",
    "PEND",
    "CHECKOUTS",
    "CONNECTS",
    "TIMEOUTS",
    "DISCARDS",
    "STALE",
    "LEAKS",
    "WAIT P99",
)
"""The pool table's columns: DISCARDS are pool_full closes, STALE stale closes, LEAKS
checkouts held past the leak threshold (in total)."""

_NAME = 32


def render(snapshots: Sequence[PoolSnapshot]) -> str:
    """The pool table the demo prints: one line per pool series."""
    layout = "{:<32} {:<12} {:>8} {:<10} {:>4} {:>4} {:>9} {:>8} {:>8} {:>8} {:>5} {:>5} {:>8}"
    lines = [layout.format(*COLUMNS)]
    for s in snapshots:
        limit = "-" if s.max is None else str(s.max)
        p99 = "-" if s.wait_p99 is None else f"{s.wait_p99 * 1000:.1f}ms"
        name = s.name if len(s.name) <= _NAME else "…" + s.name[-(_NAME - 1) :]
        lines.append(
            layout.format(
                name,
                s.kind,
                f"{s.used}/{limit}",
                _bar(s.used, s.max),
                s.idle,
                s.pending,
                s.checkouts,
                s.connects,
                s.timeouts,
                s.closed.get("pool_full", 0),
                s.closed.get("stale", 0),
                s.leaks,
                p99,
            )
        )
    return "\n".join(lines)
