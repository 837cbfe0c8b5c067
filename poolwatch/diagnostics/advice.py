"""What is wrong with a pool, and what to do about it, from what its metrics show.

The findings read two observations of a pool an interval apart (the same counts
``poolwatch top`` shows) and apply the rules of the alert runbooks, with numbers:

* **size** — Little's law: connections busy on average = demand rate x mean hold time,
  and callers waiting on average = the rate of wait-seconds (they wanted a connection as
  much). Demand counts the callers that gave up (timeouts) as well as those served. The
  recommended size is both together plus ``HEADROOM`` (half again), so that bursts find a
  free connection, and never below what is in use now — the same as the recording rule
  ``poolwatch:pool_size:recommended``.
* exhaustion (timeouts), saturation (callers waiting, 95% used), high utilization (80%),
  discards (connections opened past a non-blocking pool and thrown away), churn (a new
  connection for most checkouts), stale connections (dropped by the server while idle),
  leaks (checkouts held past the leak threshold), unbounded pools.

The thresholds are the alerts' (``poolwatch/diagnostics/thresholds.py``, generated from
``alerts/config.py``), so that the doctor reports what the alerts would fire on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from poolwatch._models import Sizing
from poolwatch.diagnostics import thresholds as _thresholds


@dataclass
class Counts:
    """What one observation says about one pool: a scrape (`top`, `doctor`) or a reading of
    the registry (sizing in `pools()`)."""

    kind: str
    name: str
    used: float = 0.0
    idle: float = 0.0
    max: float | None = None
    pending: float = 0.0
    checkouts: float = 0.0
    timeouts: float = 0.0
    discards: float = 0.0
    stale: float = 0.0
    connects: float = 0.0
    hold_total: float = 0.0
    """Seconds connections were held, summed (use.duration sum)."""
    holds: float = 0.0
    """Returns (use.duration count)."""
    wait_total: float = 0.0
    """Seconds successful checkouts waited, summed (wait.duration{outcome=acquired} sum)."""
    leaks_active: float = 0.0
    wait_buckets: dict[float, float] = field(default_factory=dict)
    """Cumulative count of successful waits at or below each bound (``le``), seconds."""
    antipatterns: set[str] = field(default_factory=set)
    """Anti-patterns the process found in this pool and still observes
    (``poolwatch.antipatterns``, less those whose ``poolwatch.antipatterns.active`` is 0)."""
    antipatterns_stopped: set[str] = field(default_factory=set)
    """Anti-patterns the process found in this pool earlier and no longer observes."""


@dataclass
class ProcessCounts:
    """What one scrape says about the process itself (the process view), if it has one."""

    file_descriptors: float | None = None
    file_descriptors_max: float | None = None
    connections: dict[tuple[str, str], float] = field(default_factory=dict)
    """TCP connections by (``network.connection.state``, ``owner``)."""


Severity = Literal["critical", "warning"]
AddFinding = Callable[[Severity, str, str, str], None]

HIGH_UTILIZATION = _thresholds.UTILIZATION_HIGH
SATURATED_UTILIZATION = _thresholds.SATURATED
CHURN_RATIO = _thresholds.CHURN_RATIO
"""New connections per checkout above which a pool is churning."""
CHURN_MIN_RATE = _thresholds.CHURN_MIN_CHECKOUTS
"""Checkouts per second below which churn is not worth reporting."""
WAITING_SHOWN = 0.05
"""Callers waiting on average below which the reasoning leaves them out (they are counted)."""
HEADROOM = _thresholds.HEADROOM
DISCARD_RATIO = _thresholds.DISCARD_RATIO
"""pool_full closes per checkout above which a pool is too small (with DISCARD_RATE).

SQLAlchemy closes an overflow connection on return by design (``pool_full``); only when
that happens for a good share of checkouts is the pool's size wrong. A non-blocking urllib3
pool's discard is a connection opened for one request: the same measure applies."""
DISCARD_RATE = _thresholds.DISCARD_RATE
"""pool_full closes per second at or below which discards are not worth reporting."""

SIZE_KNOB = {
    "sqlalchemy": "create_engine(pool_size=…, max_overflow=…) (their sum is the maximum)",
    "urllib3": "PoolManager(maxsize=…) / HTTPConnectionPool(maxsize=…)",
    "requests": "requests.adapters.HTTPAdapter(pool_maxsize=…) mounted on the Session",
    "botocore": "botocore.config.Config(max_pool_connections=…) (aiobotocore: "
    "aiobotocore.config.AioConfig(max_pool_connections=…))",
    "httpx": "httpx.Limits(max_connections=…)",
    "aiohttp": "aiohttp.TCPConnector(limit=…)",
    "redis": "max_connections=… of the redis.ConnectionPool / BlockingConnectionPool "
    "(Redis.from_url(…, max_connections=…))",
    "psycopg_pool": "psycopg_pool.ConnectionPool(max_size=…) (NullConnectionPool(max_size=…) "
    "for a null pool)",
    "asyncpg": "asyncpg.create_pool(max_size=…)",
}
STALE_FIX = {
    "sqlalchemy": "create_engine(pool_pre_ping=True), and pool_recycle below the server's or "
    "the network's idle timeout",
    "httpx": "httpx.Limits(keepalive_expiry=…) shorter than the server's idle timeout",
    "aiohttp": "aiohttp.TCPConnector(keepalive_timeout=…) shorter than the server's idle timeout",
    "redis": "redis.Redis(health_check_interval=…) shorter than the server's `timeout` (CONFIG GET "
    "timeout) or a proxy's or firewall's idle timeout, and socket_keepalive=True; redis-py "
    "reconnects a dropped connection at checkout (each costs a connect)",
    "psycopg_pool": "ConnectionPool(check=ConnectionPool.check_connection) so that a dead "
    "connection is replaced before a caller gets it, and max_idle=… below the server's or the "
    "network's idle timeout",
    "asyncpg": "asyncpg.create_pool(max_inactive_connection_lifetime=…) below the server's or "
    "the network's idle timeout (asyncpg replaces a connection the server ended at once; "
    "frequent ones mean the server or a proxy drops idle connections); from asyncpg 0.32 the "
    "min_size connections stay open however long idle, so lower min_size if they are the "
    "ones dropped",
}
UNBOUNDED_BY_CONFIGURATION = frozenset({"httpx", "aiohttp", "psycopg_pool", "redis"})
"""Kinds whose pools export no maximum only when configured without one (httpx
``max_connections=None``, aiohttp ``limit=0``, a psycopg ``NullConnectionPool`` with
``max_size=0``, redis-py ``max_connections=None``): a finding. SQLAlchemy's ``NullPool``
and friends have no limit by design."""
STALE_DEFAULT = (
    "urllib3 re-opens dropped connections itself (each costs a connect); if they are frequent, "
    "the server's keep-alive timeout is shorter than your request gaps: send requests more "
    "often on fewer connections, or ask for a longer server keep-alive"
)


@dataclass(frozen=True)
class Finding:
    """One problem with one pool."""

    severity: Severity
    kind: str
    pool: str
    topic: str
    """What kind of problem, in a word or two: ``exhausted``, ``stale``, ``unbounded``, an
    anti-pattern's name…; the printed line starts with it."""
    detail: str
    advice: str

    @property
    def problem(self) -> str:
        """The problem as printed: ``topic: detail``."""
        return f"{self.topic}: {self.detail}"


def sizing(now: Counts, before: Counts, seconds: float) -> Sizing | None:
    """Little's law with headroom, from the interval; None without returns to measure."""
    holds = now.holds - before.holds
    if seconds <= 0 or holds <= 0:
        return None
    demand = (now.checkouts - before.checkouts + now.timeouts - before.timeouts) / seconds
    hold = (now.hold_total - before.hold_total) / holds
    busy = demand * hold
    # Little's law for the queue too: callers waiting on average = the rate of wait-seconds.
    # They wanted a connection as much as the ones holding one.
    waiting = max(now.wait_total - before.wait_total, 0.0) / seconds
    size = max(math.ceil((busy + waiting) * HEADROOM), round(now.used), 1)
    queued = f" + {waiting:.1f} callers waiting" if waiting >= WAITING_SHOWN else ""
    return Sizing(
        size,
        f"{demand:.1f} checkouts/s wanted x {hold * 1000:.0f} ms mean hold = {busy:.1f} "
        f"connections busy on average{queued}; x {HEADROOM} headroom → {size}",
    )


def unbounded_advice(kind: str) -> str:
    """What to change in a pool of ``kind`` without a connection limit (the doctor's finding
    and the ``unbounded_pool`` anti-pattern say the same)."""
    knob = SIZE_KNOB.get(kind, "the pool's maximum size")
    return (
        f"set {knob}: an unbounded pool turns a slow server into a flood of connections, and "
        "the server's own connection limit becomes the first one hit"
    )


def _size_advice(kind: str, sized: Sizing | None, current: float | None) -> str:
    knob = SIZE_KNOB.get(kind, "the pool's maximum size")
    if sized is None:
        return f"raise {knob}, or hold connections for less time"
    limit = "no limit" if current is None else f"{round(current)}"
    if current is not None and sized.size <= current:
        return (
            f"the demand fits {limit} connections ({sized.reasoning}): look for bursts and "
            "long holds (p99 hold time) rather than the size"
        )
    return f"set {knob} to {sized.size} (now {limit}): {sized.reasoning}"


def findings(now: Counts, before: Counts, seconds: float) -> list[Finding]:
    """Every problem the interval shows for one pool, worst first."""
    out: list[Finding] = []
    kind, name = now.kind, now.name

    def add(severity: Severity, topic: str, detail: str, advice: str) -> None:
        out.append(Finding(severity, kind, name, topic, detail, advice))

    sized = sizing(now, before, seconds)
    # Levels are instants: a finding on them needs both observations to agree, so that
    # one unlucky scrape (a request caught between queueing and assignment) says nothing.
    utilization = _lowest_utilization(now, before)
    pending = min(now.pending, before.pending)
    timeouts = now.timeouts - before.timeouts
    interval = f"in {seconds:.0f} s"
    if timeouts > 0:
        add(
            "critical",
            "exhausted",
            f"{timeouts:.0f} callers timed out waiting for a connection {interval}",
            _size_advice(kind, sized, now.max),
        )
    elif now.max and now.used > now.max and before.used > now.max and pending == 0:
        # A non-blocking pool (urllib3 and so requests and botocore): nobody waits, the
        # connections past its size are opened now and thrown away on return.
        add(
            "warning",
            "overflowing",
            f"{now.used:.0f} connections in use for a pool of {now.max:.0f}; "
            f"the {now.used - now.max:.0f} past it are discarded when returned",
            _size_advice(kind, sized, now.max),
        )
    elif pending > 0 or (utilization is not None and utilization >= SATURATED_UTILIZATION):
        waiting = f"{now.pending:.0f} callers waiting"
        in_use = f"{now.used:.0f} of {now.max:.0f} connections in use, " if now.max else ""
        add(
            "critical",
            "saturated",
            in_use + waiting,
            _size_advice(kind, sized, now.max),
        )
    elif utilization is not None and utilization >= HIGH_UTILIZATION:
        add(
            "warning",
            "utilization high",
            f"{utilization:.0%} of {now.max:.0f} connections in use",
            _size_advice(kind, sized, now.max),
        )
    discards = now.discards - before.discards
    checkouts = now.checkouts - before.checkouts
    discarding = (
        seconds > 0
        and discards / seconds > DISCARD_RATE
        and discards > DISCARD_RATIO * max(checkouts, 1)
    )
    if discarding and kind == "sqlalchemy":
        add(
            "warning",
            "overflow churn",
            f"{discards:.0f} overflow connections opened and closed again "
            f"for {checkouts:.0f} checkouts {interval}",
            "raise pool_size towards the connections in use at busy times, so that fewer "
            "checkouts need a new overflow connection",
        )
    elif discarding:
        add(
            "warning",
            "discarding",
            f"{discards:.0f} connections opened past the pool and thrown away "
            f"{interval} (a non-blocking pool that is too small)",
            _size_advice(kind, sized, now.max),
        )
    _churn(now, before, seconds, add)
    stale = now.stale - before.stale
    if stale > 0:
        add(
            "warning",
            "stale",
            f"{stale:.0f} idle connections found dropped by the server {interval}",
            STALE_FIX.get(kind, STALE_DEFAULT),
        )
    if now.leaks_active > 0:
        add(
            "warning",
            "leak",
            f"{now.leaks_active:.0f} checkouts held past the leak threshold right now",
            "return every connection (a with block or try/finally around each checkout); "
            "look for transactions left open across slow calls",
        )
    if now.max is None and kind in UNBOUNDED_BY_CONFIGURATION:
        add(
            "warning",
            "unbounded",
            "the pool has no connection limit",
            unbounded_advice(kind),
        )
    return out


def _lowest_utilization(now: Counts, before: Counts) -> float | None:
    if not now.max:
        return None
    return min(now.used, before.used) / now.max


def _churn(now: Counts, before: Counts, seconds: float, add: AddFinding) -> None:
    checkouts = now.checkouts - before.checkouts
    connects = now.connects - before.connects
    if seconds <= 0 or checkouts <= 0 or checkouts / seconds < CHURN_MIN_RATE:
        return
    ratio = connects / checkouts
    if ratio > CHURN_RATIO:
        add(
            "warning",
            "churn",
            f"a new connection for {ratio:.0%} of {checkouts:.0f} checkouts",
            "reuse one client (Session, Client, engine) per process instead of one per "
            "request, and keep connections alive; a server answering Connection: close "
            "defeats the pool",
        )
