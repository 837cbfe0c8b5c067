"""Metric names are a contract: pinned as OpenTelemetry names and as Prometheus renders them."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
import urllib3
from sqlalchemy import exc

import poolwatch
from poolwatch import _catalogue as c
from tests.support.upstream import ThreadedUpstream

POOLWATCH_FAMILY = [
    ("poolwatch.connections", "updowncounter", "{connection}", ("state",)),
    ("poolwatch.connections.max", "updowncounter", "{connection}", ()),
    ("poolwatch.connections.idle.max", "updowncounter", "{connection}", ()),
    ("poolwatch.pending_requests", "updowncounter", "{request}", ()),
    ("poolwatch.wait.duration", "histogram", "s", ("outcome",)),
    ("poolwatch.use.duration", "histogram", "s", ()),
    ("poolwatch.connect.duration", "histogram", "s", ("outcome",)),
    ("poolwatch.connection.lifetime", "histogram", "s", ("reason",)),
    ("poolwatch.timeouts", "counter", "{timeout}", ()),
    ("poolwatch.connections.closed", "counter", "{connection}", ("reason",)),
    ("poolwatch.leaks", "counter", "{checkout}", ()),
    ("poolwatch.leaks.active", "updowncounter", "{checkout}", ()),
    ("poolwatch.checkouts.reused", "counter", "{checkout}", ()),
    ("poolwatch.antipatterns", "counter", "{detection}", ("antipattern",)),
    ("poolwatch.antipatterns.active", "updowncounter", "{detection}", ("antipattern",)),
]

PROCESS_FAMILY = [
    ("poolwatch.process.file_descriptors", "updowncounter", "{file_descriptor}", ()),
    ("poolwatch.process.file_descriptors.max", "updowncounter", "{file_descriptor}", ()),
    (
        "poolwatch.process.connections",
        "updowncounter",
        "{connection}",
        ("network.connection.state", "owner"),
    ),
]

SERVER_FAMILY = [
    ("poolwatch.server.connections.limit", "updowncounter", "{connection}", ()),
]

DB_SEMCONV = [
    (
        "db.client.connection.count",
        "updowncounter",
        "{connection}",
        ("db.client.connection.state",),
    ),
    ("db.client.connection.idle.max", "updowncounter", "{connection}", ()),
    ("db.client.connection.idle.min", "updowncounter", "{connection}", ()),
    ("db.client.connection.max", "updowncounter", "{connection}", ()),
    ("db.client.connection.pending_requests", "updowncounter", "{request}", ()),
    ("db.client.connection.timeouts", "counter", "{timeout}", ()),
    ("db.client.connection.create_time", "histogram", "s", ()),
    ("db.client.connection.wait_time", "histogram", "s", ()),
    ("db.client.connection.use_time", "histogram", "s", ()),
]

HTTP_SEMCONV = [
    ("http.client.open_connections", "updowncounter", "{connection}", ("http.connection.state",)),
    ("http.client.connection.duration", "histogram", "s", ()),
    ("http.client.request.time_in_queue", "histogram", "s", ()),
]

HTTP_PROMETHEUS_NAMES = {
    "http_client_open_connections",
    "http_client_connection_duration_seconds_bucket",
    "http_client_connection_duration_seconds_count",
    "http_client_connection_duration_seconds_sum",
    "http_client_request_time_in_queue_seconds_bucket",
    "http_client_request_time_in_queue_seconds_count",
    "http_client_request_time_in_queue_seconds_sum",
}

PROMETHEUS_NAMES = {
    "poolwatch_connections",
    "poolwatch_connections_max",
    "poolwatch_connections_idle_max",
    "poolwatch_pending_requests",
    "poolwatch_wait_duration_seconds_bucket",
    "poolwatch_wait_duration_seconds_count",
    "poolwatch_wait_duration_seconds_sum",
    "poolwatch_use_duration_seconds_bucket",
    "poolwatch_use_duration_seconds_count",
    "poolwatch_use_duration_seconds_sum",
    "poolwatch_connect_duration_seconds_bucket",
    "poolwatch_connect_duration_seconds_count",
    "poolwatch_connect_duration_seconds_sum",
    "poolwatch_connection_lifetime_seconds_bucket",
    "poolwatch_connection_lifetime_seconds_count",
    "poolwatch_connection_lifetime_seconds_sum",
    "poolwatch_timeouts_total",
    "poolwatch_connections_closed_total",
    "poolwatch_leaks_total",
    "poolwatch_leaks_active",
    "poolwatch_checkouts_reused_total",
    "db_client_connection_count",
    "db_client_connection_idle_max",
    "db_client_connection_idle_min",
    "db_client_connection_max",
    "db_client_connection_pending_requests",
    "db_client_connection_timeouts_total",
    "db_client_connection_create_time_seconds_bucket",
    "db_client_connection_create_time_seconds_count",
    "db_client_connection_create_time_seconds_sum",
    "db_client_connection_wait_time_seconds_bucket",
    "db_client_connection_wait_time_seconds_count",
    "db_client_connection_wait_time_seconds_sum",
    "db_client_connection_use_time_seconds_bucket",
    "db_client_connection_use_time_seconds_count",
    "db_client_connection_use_time_seconds_sum",
}


def test_poolwatch_family_is_pinned() -> None:
    assert [(m.name, m.instrument, m.unit, m.attributes) for m in c.POOLWATCH_METRICS] == (
        POOLWATCH_FAMILY
    )


def test_process_view_is_pinned() -> None:
    assert [(m.name, m.instrument, m.unit, m.attributes) for m in c.PROCESS_METRICS] == (
        PROCESS_FAMILY
    )
    assert c.OWNERS == ("pool", "untracked", "inbound")


def test_server_metrics_are_pinned() -> None:
    assert [(m.name, m.instrument, m.unit, m.attributes) for m in c.SERVER_METRICS] == (
        SERVER_FAMILY
    )


def test_database_semconv_mirrors_are_pinned() -> None:
    assert [(m.name, m.instrument, m.unit, m.attributes) for m in c.DB_SEMCONV_METRICS] == (
        DB_SEMCONV
    )


def test_http_semconv_mirrors_are_pinned() -> None:
    assert [(m.name, m.instrument, m.unit, m.attributes) for m in c.HTTP_SEMCONV_METRICS] == (
        HTTP_SEMCONV
    )
    assert (c.HTTP_CONNECTION_STATE, c.HTTP_STATE_ACTIVE, c.STATE_IDLE) == (
        "http.connection.state",
        "active",
        "idle",
    )


def test_attribute_values_are_pinned() -> None:
    assert c.WAIT_OUTCOMES == ("acquired", "timeout", "error")
    assert c.CONNECT_OUTCOMES == ("ok", "error")
    assert c.CLOSE_REASONS == (
        "idle_expired",
        "max_lifetime",
        "pool_full",
        "stale",
        "invalidated",
        "error",
        "disposed",
    )
    assert c.ANTIPATTERNS == (
        "client_per_request",
        "unbounded_pool",
        "no_pool_timeout",
        "pool_overflowing",
        "keepalive_too_long",
        "connection_too_old",
    )
    assert (c.POOL_NAME, c.POOL_KIND, c.SERVER_ADDRESS, c.SERVER_PORT) == (
        "pool.name",
        "pool.kind",
        "server.address",
        "server.port",
    )


def test_buckets_are_seconds_with_sub_millisecond_resolution() -> None:
    assert c.DURATION_BUCKETS[0] == 0.0001
    assert c.DURATION_BUCKETS[-1] == 60.0
    assert list(c.DURATION_BUCKETS) == sorted(set(c.DURATION_BUCKETS))


def test_every_metric_has_a_sentence_for_help() -> None:
    for metric in c.ALL_METRICS:
        assert metric.description.endswith("."), metric.name


def _exhaust_and_discard(engine: sa.Engine) -> None:
    first = engine.connect()
    second = engine.connect()  # the overflow connection
    with pytest.raises(exc.TimeoutError):
        engine.connect()
    second.close()  # returned to a full pool: closed (pool_full)
    first.close()


def test_prometheus_renders_the_pinned_names(tmp_path: Path) -> None:
    # the process view's names are pinned by tests/test_process.py
    handle = poolwatch.instrument(prometheus_port=0, semconv=True, process_view="off")
    try:
        assert handle.prometheus_address is not None
        host, port = handle.prometheus_address
        assert host == "127.0.0.1"
        engine = sa.create_engine(
            f"sqlite:///{tmp_path}/names.db", pool_size=1, max_overflow=1, pool_timeout=0.05
        )
        _exhaust_and_discard(engine)
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    finally:
        poolwatch.uninstrument()
    rendered = set(re.findall(r"^([a-z_]+)[{ ]", body, re.M)) - {"target_info"}
    assert rendered == PROMETHEUS_NAMES
    name = f"sqlite:///{tmp_path}/names.db"
    assert 'poolwatch_timeouts_total{otel_scope_name="poolwatch"' in body
    assert re.search(
        r'^poolwatch_connections_closed_total\{[^}]*pool_kind="sqlalchemy",pool_name="'
        + re.escape(name)
        + r'",reason="pool_full"\} 1\.0$',
        body,
        re.M,
    )
    assert re.search(r"^poolwatch_timeouts_total\{[^}]*\} 1\.0$", body, re.M)


def test_prometheus_renders_the_http_mirrors() -> None:
    handle = poolwatch.instrument(prometheus_port=0, semconv=True)
    try:
        assert handle.prometheus_address is not None
        host, port = handle.prometheus_address
        with ThreadedUpstream() as upstream:
            pool = urllib3.HTTPConnectionPool("127.0.0.1", upstream.port, maxsize=1)
            pool.request("GET", "/")
            pool.request("GET", "/", headers={"Connection": "close"})
            pool.request("GET", "/")  # lets go of the connection the server ended
            body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
            pool.close()
    finally:
        poolwatch.uninstrument()
    text = body.decode()
    rendered = set(re.findall(r"^([a-z_]+)[{ ]", text, re.M))
    assert rendered >= HTTP_PROMETHEUS_NAMES
    assert not {name for name in rendered if name.startswith("db_")}
    origin = upstream.origin
    assert re.search(
        r'^http_client_open_connections\{[^}]*http_connection_state="idle",[^}]*'
        + f'pool_name="{re.escape(origin)}",server_address="127.0.0.1",'
        + f'server_port="{upstream.port}"'
        + r"\} 1\.0$",
        text,
        re.M,
    ), text
    assert re.search(r"^http_client_request_time_in_queue_seconds_count\{[^}]*\} 3\.0$", text, re.M)


def test_prometheus_renders_each_declared_server_limit() -> None:
    handle = poolwatch.instrument(
        prometheus_port=0,
        process_view="off",
        server_limits={"db.internal:5432": 97, "[fd00::5]:6379": 10_000},
    )
    try:
        assert handle.prometheus_address is not None
        host, port = handle.prometheus_address
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    finally:
        poolwatch.uninstrument()
    limits = sorted(re.findall(r"^poolwatch_server_connections_limit\{(.*)\} (.*)$", body, re.M))
    assert limits == [
        (
            'otel_scope_name="poolwatch",otel_scope_schema_url="",otel_scope_version="'
            + poolwatch.__version__
            + '",server_address="db.internal",server_port="5432"',
            "97.0",
        ),
        (
            'otel_scope_name="poolwatch",otel_scope_schema_url="",otel_scope_version="'
            + poolwatch.__version__
            + '",server_address="fd00::5",server_port="6379"',
            "10000.0",
        ),
    ]


def test_a_pool_is_72_series_as_docs_operations_counts() -> None:
    """docs/operations.md sizes a fleet from this count: a pool of any kind, default buckets."""
    handle = poolwatch.instrument(prometheus_port=0, process_view="off")
    try:
        assert handle.prometheus_address is not None
        host, port = handle.prometheus_address
        engine = sa.create_engine("sqlite://", poolclass=sa.pool.QueuePool, pool_size=2)
        with ThreadedUpstream() as upstream:
            with engine.connect():
                pass
            pool = urllib3.HTTPConnectionPool("127.0.0.1", upstream.port, maxsize=2)
            pool.request("GET", "/")
            body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
            pool.close()
        engine.dispose()
    finally:
        poolwatch.uninstrument()
    kinds = re.findall(r'^poolwatch_[a-z_]+\{[^}]*pool_kind="([a-z0-9]+)"', body.decode(), re.M)
    assert {kind: kinds.count(kind) for kind in set(kinds)} == {"sqlalchemy": 72, "urllib3": 72}
    operations = (Path(__file__).resolve().parent.parent / "docs/operations.md").read_text()
    assert "| **a pool** | **72** | **always** |" in operations
    assert "| pools (72 \u00d7 10 \u00d7 1,000) | 720,000 |" in operations
