"""The demo's scenarios, as data: what ``poolwatch demo --scenario`` does, and which alerts'
conditions each makes true. The command line lists them without loading the demo."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    """Pool settings and workload shape of one demo scenario."""

    description: str
    alerts: dict[str, tuple[str, ...]]
    """The alerts whose condition the scenario makes true, by pool (none for healthy)."""
    pool_size: int = 5
    max_overflow: int = 5
    pool_timeout: float = 2.0
    hold: tuple[float, float] = (0.001, 0.01)
    """Seconds a database worker holds its connection: uniform between these."""
    pause: tuple[float, float] = (0.01, 0.05)
    """Seconds every worker waits between calls."""
    http_delay: float = 0.005
    """Seconds the upstream takes to answer."""
    http_pool: int = 10
    """requests pool_maxsize, httpx max_connections, boto3 max_pool_connections, the Redis
    pool's max_connections."""
    aws_pool: int | None = None
    """boto3 max_pool_connections, when not http_pool."""
    http_pool_timeout: float = 5.0
    """httpx pool timeout, and the Redis pool's (``BlockingConnectionPool(timeout=…)``)."""
    idle_timeout: float | None = None
    """Seconds after which the embedded upstream closes idle keep-alive connections."""
    request_per_call: bool = False
    """requests.get() per call instead of one Session."""
    leak_threshold: float | None = 30.0
    leaked: int = 0
    """Database connections a worker takes and never returns."""
    room: bool = False
    """Size every pool at twice the workers (pool_size, max_overflow 0, HTTP pools) instead
    of the sizes above: no pool ever fills, overflows or discards, whatever --workers is."""


SCENARIOS: dict[str, Scenario] = {
    "healthy": Scenario(
        "every pool sized at twice its workers: no alert's condition happens", {}, room=True
    ),
    "exhaustion": Scenario(
        "2 database connections, an httpx pool of 2 and a Redis pool of 2 for busy workers: "
        "callers time out",
        {
            "orders-db": (
                "PoolwatchPoolExhausted",
                "PoolwatchPoolSaturated",
                "PoolwatchPoolUtilizationHigh",
                "PoolwatchSlowAcquire",
            ),
            "pricing-api": ("PoolwatchPoolExhausted",),
            "sessions-cache": ("PoolwatchPoolExhausted",),
        },
        pool_size=2,
        max_overflow=0,
        pool_timeout=0.2,
        hold=(0.2, 0.5),
        pause=(0.0, 0.01),
        http_delay=0.3,
        http_pool=2,
        http_pool_timeout=0.2,
    ),
    "leak": Scenario(
        "a worker keeps 2 database connections and never returns them (threshold 3 s)",
        {"orders-db": ("PoolwatchConnectionLeak",)},
        leak_threshold=3.0,
        leaked=2,
    ),
    "churn": Scenario(
        "requests.get() per call: a new pool and a new connection for every request",
        {"inventory-api": ("PoolwatchConnectionChurn", "PoolwatchPoolAntipattern")},
        request_per_call=True,
    ),
    "stale": Scenario(
        "the upstream drops idle keep-alives after 50 ms; clients pause longer",
        {"inventory-api": ("PoolwatchPoolAntipattern",)},
        pause=(0.1, 0.2),
        idle_timeout=0.05,
    ),
    "discard": Scenario(
        "a requests pool of 2 for 8 workers, a boto3 pool of 1 for 4: a connection opened and "
        "thrown away for a fifth of their checkouts or more",
        {
            "inventory-api": ("PoolwatchPoolDiscarding", "PoolwatchPoolAntipattern"),
            "sessions-dynamodb": ("PoolwatchPoolDiscarding", "PoolwatchPoolAntipattern"),
        },
        pause=(0.0, 0.05),
        http_delay=0.05,
        http_pool=2,
        aws_pool=1,
    ),
}
