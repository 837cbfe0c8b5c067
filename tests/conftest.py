"""Fixtures shared by the suite: a metric reader per test (tests/support/harness.py), a real
PostgreSQL and a real Redis per session."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

import poolwatch
from tests.support.harness import Harness
from tests.support.truth import Readers, Seeded, seeded


@pytest.fixture(autouse=True)
def _isolated() -> Iterator[None]:
    """Each test starts with no garbage engines of earlier tests and ends uninstrumented."""
    gc.collect()
    try:
        yield
    finally:
        poolwatch.uninstrument()


@pytest.fixture
def harness() -> Iterator[Harness]:
    """A fresh provider and reader; poolwatch is uninstrumented after the test."""
    h = Harness()
    try:
        yield h
    finally:
        poolwatch.uninstrument()
        h.provider.shutdown()


@pytest.fixture
def pw(harness: Harness, request: pytest.FixtureRequest) -> Harness:
    """``harness`` already instrumented with default settings; a test marked
    ``@pytest.mark.semconv`` gets the semantic-convention mirrors turned on."""
    if request.node.get_closest_marker("semconv") is not None:
        harness.instrument(semconv=True)
    else:
        harness.instrument()
    return harness


@pytest.fixture
def sample_snapshot() -> poolwatch.PoolSnapshot:
    """A busy PostgreSQL pool, as ``poolwatch.pools()`` would report it."""
    return poolwatch.PoolSnapshot(
        name="postgresql://db:5432/orders",
        kind="sqlalchemy",
        used=8,
        idle=2,
        max=10,
        pending=3,
        instances=1,
        instances_created=1,
        checkouts=1200,
        timeouts=4,
        connects=10,
        connect_errors=0,
        closed={},
        leaks=0,
        leaks_active=0,
        wait_p99=0.0123,
    )


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A throw-away PostgreSQL cluster on a free loopback port, for the whole session."""
    from tests.support.postgres import PostgresCluster

    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    """A throw-away ``redis-server`` on a free loopback port, for the whole session."""
    from tests.support.redis import RedisServer

    with RedisServer() as server:
        yield server


# -- the ground-truth suite (tests/test_truth_*.py) -------------------------------------------
@pytest.fixture
def rng() -> Seeded:
    """The run's random generator (``POOLWATCH_TRUTH_SEED`` replays one)."""
    return seeded()


@pytest.fixture
def readers(rng: Seeded) -> Iterator[Readers]:
    """poolwatch into a provider with a cumulative and a delta reader, every collection
    checked (tests/support/truth.py)."""
    made = Readers(rng)
    try:
        yield made
    finally:
        made.shutdown()
