"""The OpenTelemetry bridge: temporality, merging, providers, OTLP to a real endpoint."""

from __future__ import annotations

import dataclasses
import gc
import http.server
import os
import subprocess
import sys
import textwrap
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy as sa
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    HistogramDataPoint,
    InMemoryMetricReader,
    Metric,
    NumberDataPoint,
    Sum,
)
from opentelemetry.sdk.metrics.export import Histogram as HistogramData

import poolwatch
from poolwatch import _export
from poolwatch._export import readers_of
from tests.support.harness import Harness
from tests.support.metrics import collect


def test_delta_readers_get_deltas(tmp_path: Path) -> None:
    delta = AggregationTemporality.DELTA
    reader = InMemoryMetricReader(
        preferred_temporality={
            Counter: delta,
            Histogram: delta,
            ObservableCounter: delta,
            UpDownCounter: AggregationTemporality.CUMULATIVE,
            ObservableUpDownCounter: AggregationTemporality.CUMULATIVE,
        }
    )
    provider = MeterProvider(metric_readers=[reader])
    poolwatch.instrument(meter_provider=provider)
    try:
        engine = sa.create_engine(
            f"sqlite:///{tmp_path}/x.db", pool_size=1, max_overflow=0, pool_timeout=0.01
        )
        for _ in range(3):
            engine.connect().close()
        first = collect(reader)
        held = engine.connect()
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        second = collect(reader)
        held.close()
    finally:
        poolwatch.uninstrument()
    wait1 = first.histogram("poolwatch.wait.duration", outcome="acquired")
    wait2 = second.histogram("poolwatch.wait.duration", outcome="acquired")
    assert (wait1.count, wait2.count) == (3, 1)
    assert wait2.start_time_unix_nano == wait1.time_unix_nano
    assert sum(wait2.bucket_counts) == 1
    assert (first.value("poolwatch.timeouts"), second.value("poolwatch.timeouts")) == (0, 1)
    assert second.metrics["poolwatch.timeouts"].data.aggregation_temporality == delta
    # levels stay cumulative (up-down counters): the current number of connections
    assert second.value("poolwatch.connections", state="used") == 1
    assert second.metrics["poolwatch.connections"].data.is_monotonic is False


def test_a_series_made_again_is_new_to_a_delta_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A series removed (its pools gone past RETENTION) and made again starts from zero with
    a new start time; its first delta is its own checkouts, never a difference taken
    against the removed series' last values (which another series' ``id()`` may recall)."""
    from poolwatch import _registry

    delta = AggregationTemporality.DELTA
    reader = InMemoryMetricReader(
        preferred_temporality={Histogram: delta, ObservableCounter: delta, Counter: delta}
    )
    provider = MeterProvider(metric_readers=[reader])
    monkeypatch.setattr(_registry, "RETENTION", 0.0)
    poolwatch.instrument(meter_provider=provider, process_view="off")
    counts: list[tuple[int, int]] = []
    try:
        engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
        poolwatch.track(engine, name="orders")
        for round_ in range(20):
            for _ in range(round_ % 3 + 1):
                engine.connect().close()
            got = collect(reader)
            point = got.histogram("poolwatch.wait.duration", outcome="acquired")
            counts.append((point.count, got.value("poolwatch.checkouts.reused")))
            engine.dispose()
            engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")  # the old one is freed
            gc.collect()
            collect(reader)  # "orders" is seen gone ...
            collect(reader)  # ... found expired, and read one last time ...
            collect(reader)  # ... and removed
            # A new "orders" series, made right after the old one was freed: CPython often
            # gives it the freed object's address, so its id().
            poolwatch.track(engine, name="orders")
    finally:
        poolwatch.uninstrument()
    assert counts == [(n % 3 + 1, n % 3) for n in range(20)]


def test_cumulative_points_keep_their_start_time(pw: object, tmp_path: Path) -> None:
    name = f"sqlite:///{tmp_path}/x.db"
    engine = sa.create_engine(name)
    engine.connect().close()
    reader = pw.reader
    wait = "poolwatch.wait.duration"
    first = collect(reader).histogram(wait, outcome="acquired", pool__name=name)
    engine.connect().close()
    second = collect(reader).histogram(wait, outcome="acquired", pool__name=name)
    assert (first.count, second.count) == (1, 2)
    assert first.start_time_unix_nano == second.start_time_unix_nano


def test_metrics_join_the_applications_own_on_its_provider(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    provider.get_meter("shop").create_counter("orders").add(2)
    poolwatch.instrument(meter_provider=provider)
    try:
        sa.create_engine(f"sqlite:///{tmp_path}/x.db").connect().close()
        data = reader.get_metrics_data()
    finally:
        poolwatch.uninstrument()
    assert data is not None
    [resource_metrics] = data.resource_metrics
    assert [s.scope.name for s in resource_metrics.scope_metrics] == ["shop", "poolwatch"]
    assert resource_metrics.resource is provider._sdk_config.resource


def test_uninstrument_gives_the_reader_back(tmp_path: Path) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    original = reader._collect
    poolwatch.instrument(meter_provider=provider)
    assert reader._collect is not original
    poolwatch.uninstrument()
    assert reader._collect is original


def test_the_global_sdk_provider_is_used_when_the_app_set_one() -> None:
    script = textwrap.dedent(
        """
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        import sqlalchemy, poolwatch
        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        metrics.set_meter_provider(provider)
        handle = poolwatch.instrument()
        assert handle.meter_provider is provider and handle.prometheus_address is None
        sqlalchemy.create_engine("sqlite://").connect().close()
        data = reader.get_metrics_data()
        print(sorted({m.name for rm in data.resource_metrics for s in rm.scope_metrics
                      for m in s.metrics if m.name.startswith("poolwatch.wait")}))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['poolwatch.wait.duration']"


class _Collector(http.server.BaseHTTPRequestHandler):
    """A loopback OTLP/HTTP endpoint that keeps what it receives."""

    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Collector.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def otlp_endpoint() -> Iterator[str]:
    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_export_from_the_environment(
    otlp_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "checkout-api")
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    handle = poolwatch.instrument()
    try:
        sa.create_engine(f"sqlite:///{tmp_path}/x.db").connect().close()
        assert handle.meter_provider.force_flush(10_000)
    finally:
        poolwatch.uninstrument()
    paths = {path for path, _ in _Collector.received}
    assert paths == {"/v1/metrics"}
    request = ExportMetricsServiceRequest()
    request.ParseFromString(_Collector.received[0][1])
    [resource_metrics] = request.resource_metrics
    resource = {a.key: a.value.string_value for a in resource_metrics.resource.attributes}
    assert resource["service.name"] == "checkout-api"
    assert resource["service.instance.id"]
    [scope] = resource_metrics.scope_metrics
    assert scope.scope.name == "poolwatch"
    wait = next(m for m in scope.metrics if m.name == "poolwatch.wait.duration")
    counts = {
        next(a.value.string_value for a in p.attributes if a.key == "outcome"): p.count
        for p in wait.histogram.data_points
    }
    assert counts == {"acquired": 1}  # timeout and error appear once they happen


def test_prometheus_port_in_use_is_a_config_error() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(poolwatch.ConfigError) as caught:
            poolwatch.instrument(prometheus_port=port)
    assert str(caught.value).startswith(
        f"poolwatch setting 'prometheus_port' got {port}: cannot listen on 127.0.0.1:{port}"
    )
    assert poolwatch.pools() == []


def test_a_second_instrument_with_other_settings_keeps_the_first(
    pw: object, caplog: pytest.LogCaptureFixture
) -> None:
    first = poolwatch.instrument()
    with caplog.at_level("WARNING", logger="poolwatch"):
        again = poolwatch.instrument(max_pools=3)
    assert again is first
    assert again.settings.max_pools == 200
    assert [r.message for r in caplog.records] == [
        "poolwatch: instrument() called again with other settings; they are ignored: call "
        "uninstrument() first to change them"
    ]


def test_no_exporter_still_serves_pools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    handle = poolwatch.instrument()
    assert readers_of(handle.meter_provider) == []
    assert handle.prometheus_address is None
    sa.create_engine(f"sqlite:///{tmp_path}/x.db").connect().close()
    assert [s.checkouts for s in poolwatch.pools()] == [1]


def test_an_unknown_otlp_protocol_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    with pytest.raises(poolwatch.ConfigError) as caught:
        poolwatch.instrument()
    assert str(caught.value) == (
        "poolwatch: OTEL_EXPORTER_OTLP_METRICS_PROTOCOL/OTEL_EXPORTER_OTLP_PROTOCOL got "
        "'http/json': expected 'grpc' or 'http/protobuf'"
    )


def _collected(tmp_path: Path) -> list[Metric]:
    reader = InMemoryMetricReader()
    # no process view: its points come from poolwatch's thread on its own schedule, so one
    # of the two collections compared could have them and the other not
    poolwatch.instrument(meter_provider=MeterProvider(metric_readers=[reader]), process_view="off")
    engine = sa.create_engine(f"sqlite:///{tmp_path}/points.db")
    with engine.connect():
        pass
    got = collect(reader)
    poolwatch.uninstrument()
    engine.dispose()
    return list(got.metrics.values())


def _rebuilt(obj: Any) -> Any:
    """The same object made by its class's own constructor (recursively)."""
    if isinstance(obj, list):
        return [_rebuilt(item) for item in obj]
    if not dataclasses.is_dataclass(obj):
        return obj
    fields = {f.name: _rebuilt(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return type(obj)(**fields)


def test_metrics_and_points_are_the_sdks_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects built by filling __dict__ equal, and behave like, the constructors' objects."""
    assert _export.FAST_POINTS  # the SDK in use has the fields poolwatch fills
    assert _export._FAST_METRICS
    fast = _collected(tmp_path)
    assert {type(m.data) for m in fast} == {Sum, HistogramData}
    points = [p for metric in fast for p in metric.data.data_points]
    assert {type(p) for p in points} == {NumberDataPoint, HistogramDataPoint}
    for metric in fast:
        assert metric == _rebuilt(metric)
        assert metric.to_json()
        with pytest.raises(dataclasses.FrozenInstanceError):
            metric.name = "renamed"
    for point in points:
        with pytest.raises(dataclasses.FrozenInstanceError):
            point.value = 1
    # As with an SDK whose classes have other fields: the constructors, the same result.
    monkeypatch.setattr(_export, "FAST_POINTS", False)
    monkeypatch.setattr(_export, "_FAST_METRICS", False)
    slow = _collected(tmp_path)
    assert [(m.name, type(m.data), [p.attributes for p in m.data.data_points]) for m in slow] == [
        (m.name, type(m.data), [p.attributes for p in m.data.data_points]) for m in fast
    ]


def _resources(received: list[tuple[str, bytes]]) -> list[dict[str, str | int]]:
    out = []
    for _, body in received:
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        for rm in request.resource_metrics:
            attributes: dict[str, str | int] = {}
            for a in rm.resource.attributes:
                attributes[a.key] = a.value.string_value or a.value.int_value
            out.append(attributes)
    return out


def test_a_forked_child_exports_as_itself(
    otlp_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefork worker gets its own service.instance.id and pid; the parent's endpoint lives."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_endpoint)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    handle = poolwatch.instrument(prometheus_port=0)
    try:
        assert handle.prometheus_address is not None
        host, port = handle.prometheus_address
        engine = sa.create_engine(f"sqlite:///{tmp_path}/fork.db")
        engine.connect().close()
        pid = os.fork()
        if pid == 0:  # the child: two checkouts of its own, exported, then leave
            code = 1
            try:
                engine.dispose(close=False)
                for _ in range(2):
                    engine.connect().close()
                child = poolwatch.instrument()
                if child.prometheus_address is None and child.meter_provider.force_flush(10_000):
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        children = _resources(_Collector.received)
        assert handle.meter_provider.force_flush(10_000)
        parents = _resources(_Collector.received[len(children) :])
        # the parent's endpoint still answers after the child closed its copy of the socket
        body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
        assert b"poolwatch_wait_duration_seconds_count" in body
    finally:
        poolwatch.uninstrument()
    assert {r["process.pid"] for r in children} == {pid}
    assert {r["process.pid"] for r in parents} == {os.getpid()}
    assert {r["service.instance.id"] for r in children}.isdisjoint(
        {r["service.instance.id"] for r in parents}
    )


def test_server_limits_are_points_of_their_own_with_every_collection(harness: Harness) -> None:
    harness.instrument(server_limits={"db.internal:5432": 97, "cache:6379": 10_000})
    for _ in range(2):  # with no pool at all, at every collection
        collected = harness.collect()
        points = collected.points("poolwatch.server.connections.limit")
        assert sorted(
            ((dict(p.attributes), p.value) for p in points), key=lambda point: point[1]
        ) == [  # attributes: the server's, and nothing of a pool
            ({"server.address": "db.internal", "server.port": 5432}, 97),
            ({"server.address": "cache", "server.port": 6379}, 10_000),
        ]
        metric = collected.metrics["poolwatch.server.connections.limit"]
        assert (metric.unit, metric.data.is_monotonic) == ("{connection}", False)
