"""Every metric poolwatch exports: name, instrument, unit, attributes, description.

This module is the public contract. Metric names, units and attribute names here are
pinned by ``tests/test_catalogue.py``, both as OpenTelemetry names and as the names the
Prometheus exporter renders. Change them only with a major version.

Two families:

* the ``poolwatch.*`` family, one set of metrics for every pool kind, so one dashboard and
  one rule set cover SQLAlchemy, urllib3, botocore, httpx and aiohttp pools alike;
* semantic-convention mirrors, emitted when ``semconv=True``: ``db.client.connection.*``
  for database pools, ``http.client.open_connections``, ``http.client.connection.duration``
  and ``http.client.request.time_in_queue`` for HTTP pools. The semconv pool metrics are
  still at Development status in OpenTelemetry, which is why the product's own contract is
  the poolwatch family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

Instrument = Literal["counter", "updowncounter", "histogram"]
"""How a metric is exported: monotonic sum, non-monotonic sum, or explicit-bucket histogram."""

# -- attribute names --------------------------------------------------------------------
POOL_NAME: Final = "pool.name"
POOL_KIND: Final = "pool.kind"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
STATE: Final = "state"
OUTCOME: Final = "outcome"
REASON: Final = "reason"
ANTIPATTERN: Final = "antipattern"
CONNECTION_STATE: Final = "network.connection.state"
"""TCP state of a process connection (``established``, ``close_wait``, … as semconv spells it)."""
OWNER: Final = "owner"
"""Who holds a process connection: ``pool``, ``untracked`` or ``inbound``."""

SEMCONV_POOL_NAME: Final = "db.client.connection.pool.name"
SEMCONV_STATE: Final = "db.client.connection.state"
HTTP_CONNECTION_STATE: Final = "http.connection.state"

# -- attribute values -------------------------------------------------------------------
STATE_USED: Final = "used"
STATE_IDLE: Final = "idle"
HTTP_STATE_ACTIVE: Final = "active"
"""``http.connection.state`` of a checked-out connection (semconv's word for used)."""

OUTCOME_ACQUIRED: Final = "acquired"
OUTCOME_TIMEOUT: Final = "timeout"
OUTCOME_ERROR: Final = "error"
WAIT_OUTCOMES: Final = (OUTCOME_ACQUIRED, OUTCOME_TIMEOUT, OUTCOME_ERROR)

CONNECT_OK: Final = "ok"
CONNECT_ERROR: Final = "error"
CONNECT_OUTCOMES: Final = (CONNECT_OK, CONNECT_ERROR)

REASON_IDLE_EXPIRED: Final = "idle_expired"
REASON_MAX_LIFETIME: Final = "max_lifetime"
REASON_POOL_FULL: Final = "pool_full"
REASON_STALE: Final = "stale"
REASON_INVALIDATED: Final = "invalidated"
REASON_ERROR: Final = "error"
REASON_DISPOSED: Final = "disposed"
CLOSE_REASONS: Final = (
    REASON_IDLE_EXPIRED,
    REASON_MAX_LIFETIME,
    REASON_POOL_FULL,
    REASON_STALE,
    REASON_INVALIDATED,
    REASON_ERROR,
    REASON_DISPOSED,
)

ANTIPATTERN_CLIENT_PER_REQUEST: Final = "client_per_request"
ANTIPATTERN_UNBOUNDED_POOL: Final = "unbounded_pool"
ANTIPATTERN_NO_POOL_TIMEOUT: Final = "no_pool_timeout"
ANTIPATTERN_POOL_OVERFLOWING: Final = "pool_overflowing"
ANTIPATTERN_KEEPALIVE_TOO_LONG: Final = "keepalive_too_long"
ANTIPATTERN_CONNECTION_TOO_OLD: Final = "connection_too_old"
ANTIPATTERNS: Final = (
    ANTIPATTERN_CLIENT_PER_REQUEST,
    ANTIPATTERN_UNBOUNDED_POOL,
    ANTIPATTERN_NO_POOL_TIMEOUT,
    ANTIPATTERN_POOL_OVERFLOWING,
    ANTIPATTERN_KEEPALIVE_TOO_LONG,
    ANTIPATTERN_CONNECTION_TOO_OLD,
)
"""Values of the ``antipattern`` attribute (docs/diagnostics.md says what each means)."""

OWNER_POOL: Final = "pool"
"""A process connection a tracked pool holds."""
OWNER_UNTRACKED: Final = "untracked"
"""An outbound process connection no tracked pool holds."""
OWNER_INBOUND: Final = "inbound"
"""A connection accepted by one of the process's listening sockets."""
OWNERS: Final = (OWNER_POOL, OWNER_UNTRACKED, OWNER_INBOUND)

# -- histogram buckets (seconds) --------------------------------------------------------
DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""Wait, connect and use durations: 100 µs resolution at the bottom, a minute at the top.

The SDK default (0 … 10000) is meant for milliseconds and would put every pool wait in
its first bucket.
"""

LIFETIME_BUCKETS: Final[tuple[float, ...]] = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    21600.0,
    86400.0,
)
"""Connection lifetimes: from a second (churn) to a day."""


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric."""

    name: str
    instrument: Instrument
    unit: str
    description: str
    attributes: tuple[str, ...] = ()
    """Attributes beyond the pool identity (pool.name, pool.kind, server.*)."""


# -- the poolwatch family ---------------------------------------------------------------
CONNECTIONS: Final = MetricSpec(
    "poolwatch.connections",
    "updowncounter",
    "{connection}",
    "Connections in the pool by state: used (checked out) or idle (open, ready).",
    (STATE,),
)
CONNECTIONS_MAX: Final = MetricSpec(
    "poolwatch.connections.max",
    "updowncounter",
    "{connection}",
    "The most connections the pool may hold at once; absent for unbounded pools.",
)
CONNECTIONS_IDLE_MAX: Final = MetricSpec(
    "poolwatch.connections.idle.max",
    "updowncounter",
    "{connection}",
    "The most idle connections the pool keeps open (SQLAlchemy pool_size, httpx "
    "max_keepalive_connections, urllib3 maxsize); absent when it keeps any number.",
)
PENDING_REQUESTS: Final = MetricSpec(
    "poolwatch.pending_requests",
    "updowncounter",
    "{request}",
    "Callers waiting for a connection right now.",
)
WAIT_DURATION: Final = MetricSpec(
    "poolwatch.wait.duration",
    "histogram",
    "s",
    "Time a caller spent getting a connection from the pool, by outcome.",
    (OUTCOME,),
)
USE_DURATION: Final = MetricSpec(
    "poolwatch.use.duration",
    "histogram",
    "s",
    "Time a connection was held between checkout and return.",
)
CONNECT_DURATION: Final = MetricSpec(
    "poolwatch.connect.duration",
    "histogram",
    "s",
    "Time to open a new connection (the driver's or socket's connect), by outcome.",
    (OUTCOME,),
)
CONNECTION_LIFETIME: Final = MetricSpec(
    "poolwatch.connection.lifetime",
    "histogram",
    "s",
    "Age of connections when they were closed, by close reason.",
    (REASON,),
)
TIMEOUTS: Final = MetricSpec(
    "poolwatch.timeouts",
    "counter",
    "{timeout}",
    "Callers that gave up waiting for a connection: the pool was exhausted.",
)
CONNECTIONS_CLOSED: Final = MetricSpec(
    "poolwatch.connections.closed",
    "counter",
    "{connection}",
    "Connections closed by the pool, by reason.",
    (REASON,),
)
LEAKS: Final = MetricSpec(
    "poolwatch.leaks",
    "counter",
    "{checkout}",
    "Checkouts held longer than the leak threshold.",
)
LEAKS_ACTIVE: Final = MetricSpec(
    "poolwatch.leaks.active",
    "updowncounter",
    "{checkout}",
    "Checkouts held longer than the leak threshold that are still out now.",
)

CHECKOUTS_REUSED: Final = MetricSpec(
    "poolwatch.checkouts.reused",
    "counter",
    "{checkout}",
    "Checkouts served by a connection that was already open (keep-alive at work); the "
    "others opened a new one.",
)
ANTIPATTERNS_DETECTED: Final = MetricSpec(
    "poolwatch.antipatterns",
    "counter",
    "{detection}",
    "Anti-patterns detected in how the pool is configured or used, by name; each is "
    "detected once per pool.",
    (ANTIPATTERN,),
)

ANTIPATTERNS_ACTIVE: Final = MetricSpec(
    "poolwatch.antipatterns.active",
    "updowncounter",
    "{detection}",
    "Anti-patterns detected in the pool that are still observed now (1), or no longer (0), "
    "by name.",
    (ANTIPATTERN,),
)

POOLWATCH_METRICS: Final = (
    CONNECTIONS,
    CONNECTIONS_MAX,
    CONNECTIONS_IDLE_MAX,
    PENDING_REQUESTS,
    WAIT_DURATION,
    USE_DURATION,
    CONNECT_DURATION,
    CONNECTION_LIFETIME,
    TIMEOUTS,
    CONNECTIONS_CLOSED,
    LEAKS,
    LEAKS_ACTIVE,
    CHECKOUTS_REUSED,
    ANTIPATTERNS_DETECTED,
    ANTIPATTERNS_ACTIVE,
)

# -- the process view (psutil): file descriptors and TCP connections of the process ------
# Points of these carry no pool identity: they describe the process.
PROCESS_FILE_DESCRIPTORS: Final = MetricSpec(
    "poolwatch.process.file_descriptors",
    "updowncounter",
    "{file_descriptor}",
    "File descriptors the process has open.",
)
PROCESS_FILE_DESCRIPTORS_MAX: Final = MetricSpec(
    "poolwatch.process.file_descriptors.max",
    "updowncounter",
    "{file_descriptor}",
    "The most file descriptors the process may open (its soft RLIMIT_NOFILE).",
)
PROCESS_CONNECTIONS: Final = MetricSpec(
    "poolwatch.process.connections",
    "updowncounter",
    "{connection}",
    "TCP connections of the process by state and owner: held by a tracked pool or untracked "
    "(outbound, no tracked pool holds it), both with server.address and server.port; or "
    "inbound.",
    (CONNECTION_STATE, OWNER),
)

PROCESS_METRICS: Final = (
    PROCESS_FILE_DESCRIPTORS,
    PROCESS_FILE_DESCRIPTORS_MAX,
    PROCESS_CONNECTIONS,
)

# -- servers: what poolwatch is told about the servers pools connect to -----------------
# Points of these carry server.address and server.port, and no pool identity: a server's
# limit belongs to the server, and rules set every instance's pools against it.
SERVER_CONNECTIONS_LIMIT: Final = MetricSpec(
    "poolwatch.server.connections.limit",
    "updowncounter",
    "{connection}",
    "The most connections the server accepts from all its clients together, as declared "
    "in the server_limits setting.",
)

SERVER_METRICS: Final = (SERVER_CONNECTIONS_LIMIT,)

# -- semantic-convention mirrors for database pools -------------------------------------
DB_CONNECTION_COUNT: Final = MetricSpec(
    "db.client.connection.count",
    "updowncounter",
    "{connection}",
    "The number of connections that are currently in state described by the state attribute.",
    (SEMCONV_STATE,),
)
DB_CONNECTION_IDLE_MAX: Final = MetricSpec(
    "db.client.connection.idle.max",
    "updowncounter",
    "{connection}",
    "The maximum number of idle open connections allowed.",
)
DB_CONNECTION_IDLE_MIN: Final = MetricSpec(
    "db.client.connection.idle.min",
    "updowncounter",
    "{connection}",
    "The minimum number of idle open connections allowed.",
)
DB_CONNECTION_MAX: Final = MetricSpec(
    "db.client.connection.max",
    "updowncounter",
    "{connection}",
    "The maximum number of open connections allowed.",
)
DB_CONNECTION_PENDING_REQUESTS: Final = MetricSpec(
    "db.client.connection.pending_requests",
    "updowncounter",
    "{request}",
    "The number of current pending requests for an open connection.",
)
DB_CONNECTION_TIMEOUTS: Final = MetricSpec(
    "db.client.connection.timeouts",
    "counter",
    "{timeout}",
    "The number of connection timeouts that have occurred trying to obtain a connection "
    "from the pool.",
)
DB_CONNECTION_CREATE_TIME: Final = MetricSpec(
    "db.client.connection.create_time",
    "histogram",
    "s",
    "The time it took to create a new connection.",
)
DB_CONNECTION_WAIT_TIME: Final = MetricSpec(
    "db.client.connection.wait_time",
    "histogram",
    "s",
    "The time it took to obtain an open connection from the pool.",
)
DB_CONNECTION_USE_TIME: Final = MetricSpec(
    "db.client.connection.use_time",
    "histogram",
    "s",
    "The time between borrowing a connection and returning it to the pool.",
)

DB_SEMCONV_METRICS: Final = (
    DB_CONNECTION_COUNT,
    DB_CONNECTION_IDLE_MAX,
    DB_CONNECTION_IDLE_MIN,
    DB_CONNECTION_MAX,
    DB_CONNECTION_PENDING_REQUESTS,
    DB_CONNECTION_TIMEOUTS,
    DB_CONNECTION_CREATE_TIME,
    DB_CONNECTION_WAIT_TIME,
    DB_CONNECTION_USE_TIME,
)

# -- semantic-convention mirrors for HTTP pools -----------------------------------------
# Besides the semconv attributes, each point carries ``pool.name``: two clients of one
# server (a requests Session and a boto3 client, say) are distinct pools, and without it
# their points would collide into one time series.
HTTP_OPEN_CONNECTIONS: Final = MetricSpec(
    "http.client.open_connections",
    "updowncounter",
    "{connection}",
    "Number of outbound HTTP connections that are currently active or idle on the client.",
    (HTTP_CONNECTION_STATE,),
)
HTTP_CONNECTION_DURATION: Final = MetricSpec(
    "http.client.connection.duration",
    "histogram",
    "s",
    "The duration of the successfully established outbound HTTP connections.",
)
HTTP_TIME_IN_QUEUE: Final = MetricSpec(
    "http.client.request.time_in_queue",
    "histogram",
    "s",
    "The amount of time requests spent on a queue waiting for an available connection.",
)

HTTP_SEMCONV_METRICS: Final = (
    HTTP_OPEN_CONNECTIONS,
    HTTP_CONNECTION_DURATION,
    HTTP_TIME_IN_QUEUE,
)

ALL_METRICS: Final = (
    POOLWATCH_METRICS + PROCESS_METRICS + SERVER_METRICS + DB_SEMCONV_METRICS + HTTP_SEMCONV_METRICS
)

SCOPE_NAME: Final = "poolwatch"
"""The instrumentation scope every poolwatch metric is exported under."""
