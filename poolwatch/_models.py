"""The values poolwatch's layers hand each other: a leaf module, importing nothing of poolwatch.

Adapters make ``Levels`` (and ``HostLevels``, ``Misconfiguration``); the registry, the
diagnostics and the exporter read them; ``PoolSnapshot`` (with ``Antipattern`` and
``Sizing``) is what ``poolwatch.pools()`` returns. All immutable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class HostLevels(NamedTuple):
    """The part of a multi-host pool's levels that belongs to one server."""

    address: str
    """``server.address``: host name or IP literal, as the pool addresses it."""
    port: int
    """``server.port``."""
    used: int
    idle: int
    pending: int = 0
    """Callers waiting for a connection to this server now."""


class Misconfiguration(NamedTuple):
    """A configuration anti-pattern an adapter sees on a pool (``_antipatterns.py``)."""

    antipattern: str
    """One of ``_catalogue.ANTIPATTERNS``: ``unbounded_pool`` or ``no_pool_timeout``."""
    setting: str
    """The setting as the application wrote it, e.g. ``httpx.Limits(max_connections=None)``."""


class Levels(NamedTuple):
    """A pool's levels at one moment, read from the pool itself."""

    used: int
    """Connections checked out."""
    idle: int
    """Open connections ready to be checked out."""
    max: int | None
    """The most connections the pool may hold at once; None when unbounded."""
    pending: int
    """Callers waiting for a connection now."""
    idle_max: int | None = None
    """The most idle connections the pool keeps (database semconv); None if unknown."""
    idle_min: int | None = None
    """The fewest idle connections the pool keeps (database semconv); None if unknown."""
    hosts: tuple[HostLevels, ...] = ()
    """For a pool that spans servers (httpx, aiohttp): used and idle per server.

    When given, ``poolwatch.connections`` is exported per server with ``server.address``
    and ``server.port``; ``used`` and ``idle`` above remain the pool's totals.
    """


@dataclass(frozen=True)
class Antipattern:
    """One anti-pattern found in one pool series."""

    name: str
    """The ``antipattern`` attribute: one of ``client_per_request``, ``unbounded_pool``,
    ``no_pool_timeout``, ``pool_overflowing``, ``keepalive_too_long``,
    ``connection_too_old``."""
    problem: str
    """What was seen, with its numbers."""
    advice: str
    """What to change."""
    active: bool = True
    """Whether it is still observed now: for a configuration (``unbounded_pool``,
    ``no_pool_timeout``), while the pools configured that way are alive; for
    ``connection_too_old``, while such a connection is open; for the others, while their
    signs (pools created per request, discards, stale closes) keep coming, the last less than
    five minutes ago (docs/diagnostics.md)."""


@dataclass(frozen=True)
class Sizing:
    """A recommended pool size and how it was reached."""

    size: int
    reasoning: str


@dataclass(frozen=True)
class PoolSnapshot:
    """One pool series as ``poolwatch.pools()`` reports it."""

    name: str
    kind: str
    used: int
    idle: int
    max: int | None
    pending: int
    instances: int
    """Live pool objects behind this series (more than one: same target, same site)."""
    instances_created: int
    """Pool objects created for this series since it appeared."""
    checkouts: int
    timeouts: int
    connects: int
    connect_errors: int
    closed: dict[str, int]
    leaks: int
    leaks_active: int
    wait_p99: float | None
    """Estimated 99th percentile of successful waits, in seconds."""
    attributes: dict[str, str | int] = field(default_factory=dict)
    idle_max: int | None = None
    """The most idle connections the pool keeps; None when it keeps any number."""
    reused: int = 0
    """Checkouts served by a connection that was already open (keep-alive at work).

    Every pool poolwatch knows opens a connection for the checkout that needs one, so the
    checkouts that did not open one — successfully or not — reused a connection.
    """
    antipatterns: tuple[Antipattern, ...] = ()
    """Anti-patterns found in how the pool is configured or used (docs/diagnostics.md)."""
    sizing: Sizing | None = None
    """The recommended size from the last minutes' demand and hold time (Little's law with
    half again as headroom), with its reasoning; None before any connection came back."""

    @property
    def utilization(self) -> float | None:
        """used / max, or None for an unbounded pool."""
        if not self.max:
            return None
        return self.used / self.max

    @property
    def reuse_ratio(self) -> float | None:
        """reused / checkouts: near 1 for a warm pool, 0 when every request connects."""
        return self.reused / self.checkouts if self.checkouts else None

    def __repr__(self) -> str:
        limit = "unbounded" if self.max is None else str(self.max)
        return (
            f"<PoolSnapshot {self.kind} {self.name!r} [used {self.used}, idle {self.idle}, "
            f"max {limit}, pending {self.pending} | checkouts {self.checkouts}, "
            f"timeouts {self.timeouts}]>"
        )
