"""The pools of ``poolwatch demo`` (``poolwatch/_demo/workload.py``), for the tests that run it."""

from __future__ import annotations

import time

from poolwatch.cli import top as _top

POOLS = {
    "orders-db": "sqlalchemy",
    "inventory-api": "requests",
    "pricing-api": "httpx",
    "pricing-api-async": "httpx",
    "sessions-dynamodb": "botocore",
    "sessions-cache": "redis",
}
"""Every pool the demo starts, by name, with its ``pool.kind`` (all its libraries are
installed for the tests)."""
ON_POSTGRESQL = {"reports-db": "psycopg_pool"}
"""The pools the demo starts besides when its database is PostgreSQL (the default, when
the server binaries are on the machine)."""


def until_serving(url: str, seconds: float = 180.0) -> None:
    """Until the demo's metrics at ``url`` show every one of its pools.

    The pools start one after another, the httpx AsyncClient in a thread of its own and
    boto3's after moto's backend: with several demos on two cores the last appears seconds
    after the first, and a reading taken before would find pools missing, or appearing
    while it watches. Six demos at once serve all their pools after about 16 s on this
    project's two-core machine; the default deadline leaves a slower one room.
    """
    deadline = time.monotonic() + seconds
    missing = list(POOLS)
    while time.monotonic() < deadline:
        try:
            served = _top.fetch(url)
            missing = [name for name in POOLS if f'pool_name="{name}"' not in served]
            if not missing:
                return
        except _top.TopError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not serve {', '.join(missing)} within {seconds:.0f} s")
