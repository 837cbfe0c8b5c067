"""Anti-patterns in how a pool is configured or used, detected while the application runs.

Each is reported once per pool series — a WARNING naming the pool, what was seen and what
to do; in ``PoolSnapshot.antipatterns``; and as ``poolwatch.antipatterns`` with the
anti-pattern's name, value 1 — and never on the application's thread: detection looks at
the readings of a collection round (``_collect.Collector``), once per round whatever the
number of readers, and keeps what it found itself, by series.

Once found, an anti-pattern is *active* while it is still observed
(``Antipattern.active``, ``poolwatch.antipatterns.active`` 1 or 0), so that what alerts on
it resolves when it stops:

======================  ===================================================================
anti-pattern            active while
======================  ===================================================================
client_per_request      pool instances are still being created at that place: the last one
                        less than ``STILL_SEEN`` seconds ago
unbounded_pool,         the series still has pools alive (the configuration is theirs)
no_pool_timeout
pool_overflowing        connections are still discarded: the last less than ``STILL_SEEN``
                        seconds ago
keepalive_too_long      idle connections are still found closed by the server: the last
                        less than ``STILL_SEEN`` seconds ago
connection_too_old      an open connection is still older than ``connection_max_age``
======================  ===================================================================

======================  ===================================================================
anti-pattern            detected when
======================  ===================================================================
client_per_request      at least 10 pool instances were created at one place in user code,
                        with at most 5 checkouts each: a new client (Session, Client,
                        engine, boto3 client) per request, so a new connection per request
unbounded_pool          the pool has no connection limit by configuration (the adapter
                        says which setting: httpx ``max_connections=None``, aiohttp
                        ``limit=0``, SQLAlchemy ``max_overflow=-1``, redis-py
                        ``max_connections=None`` before redis-py 8, psycopg_pool
                        ``NullConnectionPool(max_size=0)``, its default)
no_pool_timeout         a caller can wait for a connection for ever (requests
                        ``pool_block=True``, urllib3 ``block=True`` seen waiting without a
                        ``pool_timeout``, httpx ``Timeout(pool=None)``, SQLAlchemy
                        ``pool_timeout=None``, aiohttp without ``total`` or ``connect``,
                        redis-py ``BlockingConnectionPool(timeout=None)``, aiobotocore seen
                        waiting: it sets no bound, asyncpg ``acquire()`` without
                        ``timeout=`` seen with callers waiting; psycopg_pool always has a
                        timeout)
pool_overflowing        a non-blocking pool (urllib3, requests, botocore) discarded at
                        least 5 connections opened past its size, 1% of checkouts or more
keepalive_too_long      an HTTP pool found at least 3 idle connections closed by the server
                        on reuse, 5% of checkouts or more, at 3 collections or more (a
                        single burst — the server restarted — is not the pattern)
connection_too_old      ``connection_max_age`` is set and an open connection is older: it
                        still talks to the address DNS gave when it opened
======================  ===================================================================

The thresholds are deliberately conservative: one finding that is wrong costs the reader's
trust in every other. ``tests/test_antipatterns.py`` reproduces each for real, and runs a
healthy workload that must produce none.
"""

from __future__ import annotations

import dataclasses
import time

from poolwatch import _catalogue as c
from poolwatch._config import Settings
from poolwatch._ledger import LedgerSnapshot
from poolwatch._models import Antipattern, Misconfiguration
from poolwatch._registry import SeriesReading
from poolwatch._safe import logger
from poolwatch.diagnostics.advice import SIZE_KNOB, STALE_DEFAULT, STALE_FIX, unbounded_advice

PER_REQUEST_INSTANCES = 10
"""Pool instances created at one place before ``client_per_request`` is considered."""
PER_REQUEST_CHECKOUTS = 5
"""Checkouts per instance at or below which those instances served a request or so each."""
OVERFLOW_DISCARDS = 5
"""Discards a non-blocking pool makes before ``pool_overflowing`` is considered."""
OVERFLOW_SHARE = 0.01
"""Discards per checkout from which a non-blocking pool is overflowing."""
STALE_CLOSES = 3
"""Stale closes before ``keepalive_too_long`` is considered."""
STALE_SHARE = 0.05
"""Stale closes per checkout from which keep-alive outlives the server's idle timeout."""
STALE_COLLECTIONS = 3
"""Collection rounds at which stale closes grew: recurring, not one burst."""
POOLS_CHECKED = 3
"""Pool instances of a series whose configuration is read (they share a creation site)."""
STILL_SEEN = 300.0
"""Seconds after the last sign of a usage anti-pattern (a pool instance created at the place,
a discard, a stale close) during which it is still active. Five minutes: longer than the
pause between two bursts of a periodic job, short enough that an alert on it resolves
soon after a fix is deployed."""

NON_BLOCKING_KINDS = frozenset({"urllib3", "requests", "botocore"})
"""Kinds whose pools open connections past their size and discard them (``block=False``)."""

_PER_REQUEST_FIX = {
    "sqlalchemy": "create the engine once per process (at start-up, or at module level) and "
    "share it; call engine.dispose() only after a fork",
    "requests": "use one requests.Session per process, made at start-up, instead of "
    "requests.get() or a Session per call",
    "botocore": "create each boto3 client once per process and reuse it: clients are thread-safe "
    "(aiobotocore: enter each session.create_client(…) once, at start-up, and share the client)",
    "urllib3": "use one urllib3.PoolManager per process instead of one per request",
    "httpx": "use one httpx.Client or AsyncClient per process (a FastAPI lifespan, app "
    "start-up) instead of httpx.get() or a client per request",
    "aiohttp": "use one aiohttp.ClientSession per process and event loop instead of one per "
    "request",
    "redis": "create one redis.Redis (or redis.ConnectionPool) per process at start-up and share "
    "it: clients are thread-safe (asyncio: one redis.asyncio.Redis per event loop); "
    "Redis.from_url() or Redis() per call makes a pool, and a connection, per call",
    "psycopg_pool": "open one ConnectionPool per process (at start-up, a FastAPI lifespan, "
    "Django's OPTIONS['pool']) and share it, instead of a pool per request",
    "asyncpg": "create one pool per process and event loop with asyncpg.create_pool() (a "
    "FastAPI lifespan) and share it, instead of a pool or asyncpg.connect() per request",
}
_TIMEOUT_FIX = {
    "requests": "requests passes no pool timeout: keep pool_block=False (the default) and "
    "size the pool, or use urllib3 directly with block=True and urlopen(pool_timeout=…)",
    "urllib3": "pass pool_timeout=… to urlopen()/request() so that an exhausted pool fails "
    "fast with EmptyPoolError",
    "httpx": "set httpx.Timeout(…, pool=…) so that an exhausted pool fails fast with "
    "httpx.PoolTimeout",
    "sqlalchemy": "set create_engine(pool_timeout=…) so that an exhausted pool fails fast "
    "with sqlalchemy.exc.TimeoutError",
    "aiohttp": "set aiohttp.ClientTimeout(total=…, connect=…): connect bounds the wait for a "
    "connection",
    "redis": "set redis.BlockingConnectionPool(timeout=…) so that an exhausted pool fails fast "
    "with ConnectionError('No connection available.')",
    "botocore": "aiobotocore waits for a free connection for ever (its aiohttp session sets no "
    "total or connect timeout): bound each call (asyncio.timeout(…) around it), size "
    "AioConfig(max_pool_connections=…) to the calls in flight, and read or close every "
    "streaming body so that its connection comes back",
    "psycopg_pool": "set ConnectionPool(timeout=…) so that an exhausted pool fails fast with "
    "psycopg_pool.PoolTimeout",
    "asyncpg": "pass timeout=… to Pool.acquire() (asyncpg waits for ever by default) so that "
    "an exhausted pool fails fast with TimeoutError",
}
_AGE_FIX = {
    "sqlalchemy": "set create_engine(pool_recycle=…) below connection_max_age",
    "httpx": "httpx closes only idle connections (Limits(keepalive_expiry=…)); to follow DNS "
    "changes, replace the client periodically",
    "aiohttp": "aiohttp closes only idle connections (TCPConnector(keepalive_timeout=…)); to "
    "follow DNS changes, replace the session periodically",
    "redis": "redis-py closes no connection for its age: to follow DNS changes (a failover "
    "behind a name), call pool.disconnect() periodically, or use Sentinel or cluster clients, "
    "which follow topology changes themselves",
    "psycopg_pool": "set ConnectionPool(max_lifetime=…) below connection_max_age",
    "asyncpg": "asyncpg has no connection age limit: lower create_pool(max_queries=…), or call "
    "Pool.expire_connections() periodically, to replace connections",
}
_AGE_DEFAULT = (
    "urllib3 has no connection age limit: to follow DNS changes, close the pools "
    "periodically (PoolManager.clear(), Session.close(), a new boto3 client)"
)


def advice_for(antipattern: str, kind: str) -> str:
    """What to change, for one anti-pattern in a pool of ``kind`` (also ``poolwatch doctor``'s,
    for the anti-patterns a process exports)."""
    if antipattern == c.ANTIPATTERN_CLIENT_PER_REQUEST:
        return _PER_REQUEST_FIX.get(kind, "create the client once per process and reuse it")
    if antipattern == c.ANTIPATTERN_UNBOUNDED_POOL:
        return unbounded_advice(kind)
    if antipattern == c.ANTIPATTERN_NO_POOL_TIMEOUT:
        return _TIMEOUT_FIX.get(kind, "give callers a pool timeout")
    if antipattern == c.ANTIPATTERN_POOL_OVERFLOWING:
        knob = SIZE_KNOB.get(kind, "the pool's maximum size")
        return (
            f"raise {knob} to the number of concurrent requests (threads or workers sharing "
            "the client); the pool's recommended size is in poolwatch.pools() and "
            "`poolwatch doctor`"
        )
    if antipattern == c.ANTIPATTERN_KEEPALIVE_TOO_LONG:
        return STALE_FIX.get(kind, STALE_DEFAULT)
    return _AGE_FIX.get(kind, _AGE_DEFAULT)


class Watch:
    """What detection remembers about one series between rounds."""

    __slots__ = (
        "checked_instances",
        "discards_seen",
        "found",
        "instances_seen",
        "last",
        "live",
        "signs",
        "stale_rounds",
        "stale_seen",
        "too_old",
    )

    def __init__(self) -> None:
        self.found: dict[str, Antipattern] = {}
        """Anti-patterns found, by name, in the order found."""
        self.checked_instances = 0
        """``instances_created`` when the configuration was last read."""
        self.last: LedgerSnapshot | None = None
        """The ledger snapshot last checked (an idle series hands out the same one)."""
        self.stale_seen = 0
        self.stale_rounds = 0
        """Rounds at which stale closes had grown."""
        self.instances_seen = 0
        self.discards_seen = 0
        self.signs: dict[str, float] = {}
        """By usage anti-pattern: when (monotonic) its last sign was seen."""
        self.live = False
        """Whether the series had pools alive at the last round."""
        self.too_old = False
        """Whether an open connection was older than ``connection_max_age`` at the last round."""

    def active(self, name: str, now: float) -> bool:
        """Whether the anti-pattern ``name``, once found, is still observed."""
        if name in _CONFIGURED:
            return self.live
        if name == c.ANTIPATTERN_CONNECTION_TOO_OLD:
            return self.too_old
        return now - self.signs.get(name, -STILL_SEEN) < STILL_SEEN


_CONFIGURED = frozenset({c.ANTIPATTERN_UNBOUNDED_POOL, c.ANTIPATTERN_NO_POOL_TIMEOUT})
"""Anti-patterns of a pool's configuration: active while the series has pools alive."""


class Detector:
    """Looks at every series of a collection round; see the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self._max_age = settings.connection_max_age
        self._watches: dict[int, Watch] = {}

    def found(self, serial: int) -> tuple[Antipattern, ...]:
        """The anti-patterns found in the series ``serial``, in the order found, each with
        whether it is still observed (``active``)."""
        watch = self._watches.get(serial)
        if watch is None or not watch.found:
            return ()
        now = time.monotonic()
        return tuple(
            found if watch.active(name, now) else dataclasses.replace(found, active=False)
            for name, found in watch.found.items()
        )

    def forget(self, serial: int) -> None:
        """A series was removed."""
        self._watches.pop(serial, None)

    def check(self, reading: SeriesReading) -> None:
        """Look at one series as just read; report what is new."""
        series, levels, ledger = reading.series, reading.levels, reading.ledger
        watch = self._watches.get(series.serial)
        if watch is None:
            watch = self._watches[series.serial] = Watch()
        found = watch.found
        watch.live = reading.instances > 0
        if (
            ledger is watch.last  # an idle series hands out the same snapshot: nothing new
            and watch.checked_instances == reading.instances_created
            and not levels.pending
            and self._max_age is None
        ):
            return
        new: list[Antipattern] = []
        pools = [pool for pool in (ref() for ref in reading.pools) if pool is not None]
        if pools and (
            watch.checked_instances != reading.instances_created
            or (levels.pending and c.ANTIPATTERN_NO_POOL_TIMEOUT not in found)
        ):
            watch.checked_instances = reading.instances_created
            for pool in pools[:POOLS_CHECKED]:
                for misconfiguration in series.adapter.misconfigurations(pool):
                    if misconfiguration.antipattern not in found and all(
                        a.name != misconfiguration.antipattern for a in new
                    ):
                        new.append(_configured(series.kind, misconfiguration))
        if ledger is not watch.last:
            watch.last = ledger
            new.extend(_observed(reading, watch))
        if self._max_age is not None:  # every round: it stops once old connections are closed
            ages = [series.adapter.oldest_connection(pool) for pool in pools]
            oldest = max((age for age in ages if age is not None), default=None)
            watch.too_old = oldest is not None and oldest > self._max_age
            if (
                oldest is not None
                and oldest > self._max_age
                and c.ANTIPATTERN_CONNECTION_TOO_OLD not in found
            ):
                new.append(
                    Antipattern(
                        c.ANTIPATTERN_CONNECTION_TOO_OLD,
                        f"a connection has been open for {oldest:.0f} s, past "
                        f"connection_max_age={self._max_age:g} s: it still talks to the address "
                        "DNS gave when it opened (a failover or rotation goes unnoticed)",
                        advice_for(c.ANTIPATTERN_CONNECTION_TOO_OLD, series.kind),
                    )
                )
        for antipattern in new:
            found[antipattern.name] = antipattern
            logger.warning(
                "poolwatch: pool %r (%s): %s: %s. Advice: %s",
                series.name,
                series.kind,
                antipattern.name,
                antipattern.problem,
                antipattern.advice,
            )


def _configured(kind: str, found: Misconfiguration) -> Antipattern:
    if found.antipattern == c.ANTIPATTERN_UNBOUNDED_POOL:
        problem = f"{found.setting}: the pool has no connection limit"
    else:
        problem = (
            f"{found.setting}: when the pool is exhausted a caller waits for a connection for ever"
        )
    return Antipattern(found.antipattern, problem, advice_for(found.antipattern, kind))


def _observed(reading: SeriesReading, watch: Watch) -> list[Antipattern]:
    series, ledger = reading.series, reading.ledger
    found = watch.found
    kind = series.kind
    checkouts = ledger.checkouts
    out: list[Antipattern] = []
    instances = reading.instances_created
    now = time.monotonic()
    if instances > watch.instances_seen:  # signs of the usage anti-patterns, once found
        watch.instances_seen = instances
        watch.signs[c.ANTIPATTERN_CLIENT_PER_REQUEST] = now
    if ledger.closed[c.REASON_POOL_FULL] > watch.discards_seen:
        watch.discards_seen = ledger.closed[c.REASON_POOL_FULL]
        watch.signs[c.ANTIPATTERN_POOL_OVERFLOWING] = now
    if ledger.closed[c.REASON_STALE] > watch.stale_seen:
        watch.signs[c.ANTIPATTERN_KEEPALIVE_TOO_LONG] = now
    if (
        c.ANTIPATTERN_CLIENT_PER_REQUEST not in found
        and instances >= PER_REQUEST_INSTANCES
        and checkouts <= PER_REQUEST_CHECKOUTS * instances
    ):
        where = f"at {series.site}" if series.site else "at one place"
        out.append(
            Antipattern(
                c.ANTIPATTERN_CLIENT_PER_REQUEST,
                f"{instances} pool instances were created {where} for {checkouts} checkouts: a "
                "new client per request, so every request opens a new connection (TCP, TLS) "
                "and none is reused",
                advice_for(c.ANTIPATTERN_CLIENT_PER_REQUEST, kind),
            )
        )
    discards = ledger.closed[c.REASON_POOL_FULL]
    if (
        c.ANTIPATTERN_POOL_OVERFLOWING not in found
        and kind in NON_BLOCKING_KINDS
        and discards >= OVERFLOW_DISCARDS
        and discards >= OVERFLOW_SHARE * checkouts
    ):
        out.append(
            Antipattern(
                c.ANTIPATTERN_POOL_OVERFLOWING,
                f"{discards} connections were opened past the pool's size and discarded when "
                f"returned ('Connection pool is full, discarding connection'), for {checkouts} "
                "checkouts: a non-blocking pool smaller than the concurrency it serves",
                advice_for(c.ANTIPATTERN_POOL_OVERFLOWING, kind),
            )
        )
    stale = ledger.closed[c.REASON_STALE]
    if stale > watch.stale_seen:
        watch.stale_seen = stale
        watch.stale_rounds += 1
    if (
        c.ANTIPATTERN_KEEPALIVE_TOO_LONG not in found
        and series.adapter.family == "http"
        and stale >= STALE_CLOSES
        and stale >= STALE_SHARE * checkouts
        and watch.stale_rounds >= STALE_COLLECTIONS
    ):
        share = stale / checkouts if checkouts else 1.0
        out.append(
            Antipattern(
                c.ANTIPATTERN_KEEPALIVE_TOO_LONG,
                f"{stale} idle connections were found closed by the server when reused "
                f"({share:.0%} of {checkouts} checkouts): the client keeps idle connections "
                "longer than the server does",
                advice_for(c.ANTIPATTERN_KEEPALIVE_TOO_LONG, kind),
            )
        )
    return out
