"""The OpenTelemetry bridge: finished data points handed to every SDK reader at collection.

OpenTelemetry's specification has a *MetricProducer*: a source of already-aggregated
metrics that a MetricReader merges into each collection. The Python SDK does not have it
yet (opentelemetry-python issue 4768), so poolwatch attaches its producer to each reader
of the MeterProvider itself: it wraps the reader's collect callback, lets the SDK collect
as usual, and appends one ``poolwatch`` scope built from the pool ledgers and levels.

Why not observable instruments: at collection the SDK spends about 26 µs per observation
(measured on this project's machine), and a pool needs ~15 points; building the points
directly costs a few microseconds per pool, keeps histograms exact (bucket counts, sum,
min, max straight from the ledger, which a histogram instrument could only approximate by
re-recording values), and still reaches every exporter — OTLP, Prometheus, console — as
ordinary sums and histograms, with the temporality each reader asks for.

Limits, documented in docs/architecture.md: Views configured on the provider do not apply
to poolwatch metrics; a reader added to the provider after ``instrument()`` is not fed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from math import inf
from typing import Any

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from poolwatch import _catalogue as c
from poolwatch._config import Settings
from poolwatch._ledger import HistogramSnapshot
from poolwatch._registry import Registry, SeriesReading
from poolwatch._safe import ErrorLog
from poolwatch._version import __version__

_TEMPORALITY_CLASS: dict[c.Instrument, str] = {
    "counter": "ObservableCounter",
    "updowncounter": "ObservableUpDownCounter",
    "histogram": "Histogram",
}
"""Whose temporality preference a poolwatch metric follows, by SDK instrument class name."""


def temporalities(reader: MetricReader) -> dict[c.Instrument, AggregationTemporality]:
    """The temporality ``reader`` prefers for each kind of poolwatch metric.

    Readers key their preferences by the SDK's private instrument classes (``_Histogram``);
    matching by name keeps poolwatch independent of where those classes live.
    """
    by_name = {
        cls.__name__.lstrip("_"): temporality
        for cls, temporality in reader._instrument_class_temporality.items()
    }
    return {
        kind: by_name.get(name, AggregationTemporality.CUMULATIVE)
        for kind, name in _TEMPORALITY_CLASS.items()
    }


Attributes = tuple[tuple[str, str | int], ...]
PointKey = tuple[str, Attributes, int]
"""(metric name, attributes, series start) identifies one exported time series."""


@dataclass(frozen=True)
class _SumPoint:
    attributes: Attributes
    value: int
    start_ns: int


@dataclass(frozen=True)
class _HistogramPoint:
    attributes: Attributes
    value: HistogramSnapshot
    start_ns: int


class _ReaderState:
    """What one reader saw at its previous collection, for delta temporality."""

    def __init__(self) -> None:
        self.last_ns = 0
        self.previous: dict[PointKey, int | HistogramSnapshot] = {}


def _delta_histogram(now: HistogramSnapshot, before: HistogramSnapshot | None) -> HistogramSnapshot:
    if before is None:
        return now
    counts = tuple(a - b for a, b in zip(now.counts, before.counts, strict=True))
    bounds = now.bounds
    filled = [i for i, n in enumerate(counts) if n]
    if not filled:
        return HistogramSnapshot(bounds, counts, 0.0, inf, -inf)
    # The interval's exact min/max are not kept; bound them by the buckets that filled.
    low = bounds[filled[0] - 1] if filled[0] > 0 else now.min
    high = bounds[filled[-1]] if filled[-1] < len(bounds) else now.max
    return HistogramSnapshot(
        bounds, counts, now.total - before.total, max(low, now.min), min(high, now.max)
    )


class Producer:
    """Builds poolwatch's metrics from the registry, per reader and temporality."""

    def __init__(self, registry: Registry, settings: Settings, errors: ErrorLog) -> None:
        self._registry = registry
        self._settings = settings
        self._errors = errors
        self._lock = threading.Lock()
        self._states: dict[int, _ReaderState] = {}
        self.scope = InstrumentationScope(c.SCOPE_NAME, __version__)

    def reset(self) -> None:
        """Forget every reader's previous collection (a forked child starts over)."""
        self._lock = threading.Lock()
        self._states = {}

    def points(self, readings: Sequence[SeriesReading]) -> dict[str, list[Any]]:
        """Cumulative points of every metric, by metric name."""
        out: dict[str, list[Any]] = {spec.name: [] for spec in c.ALL_METRICS}

        def add(spec: c.MetricSpec, attrs: dict[str, str | int], value: Any, start: int) -> None:
            key = tuple(sorted(attrs.items()))
            if spec.instrument == "histogram":
                out[spec.name].append(_HistogramPoint(key, value, start))
            else:
                out[spec.name].append(_SumPoint(key, value, start))

        for reading in readings:
            series, levels, ledger = reading.series, reading.levels, reading.ledger
            start = series.created_ns
            base: dict[str, str | int] = {c.POOL_NAME: series.name, c.POOL_KIND: series.kind}
            base.update(series.attributes)
            add(c.CONNECTIONS, {**base, c.STATE: c.STATE_USED}, levels.used, start)
            add(c.CONNECTIONS, {**base, c.STATE: c.STATE_IDLE}, levels.idle, start)
            if levels.max is not None:
                add(c.CONNECTIONS_MAX, base, levels.max, start)
            add(c.PENDING_REQUESTS, base, levels.pending, start)
            for outcome in c.WAIT_OUTCOMES:
                add(c.WAIT_DURATION, {**base, c.OUTCOME: outcome}, ledger.wait[outcome], start)
            add(c.USE_DURATION, base, ledger.use, start)
            for outcome in c.CONNECT_OUTCOMES:
                add(
                    c.CONNECT_DURATION, {**base, c.OUTCOME: outcome}, ledger.connect[outcome], start
                )
            for reason, lifetimes in ledger.lifetime.items():
                add(c.CONNECTION_LIFETIME, {**base, c.REASON: reason}, lifetimes, start)
            add(c.TIMEOUTS, base, ledger.timeouts, start)
            for reason in c.CLOSE_REASONS:
                closed = ledger.closed.get(reason, 0)
                add(c.CONNECTIONS_CLOSED, {**base, c.REASON: reason}, closed, start)
            add(c.LEAKS, base, ledger.leaks, start)
            add(c.LEAKS_ACTIVE, base, ledger.leaks_active, start)
            if self._settings.semconv and series.adapter.database:
                pool: dict[str, str | int] = {c.SEMCONV_POOL_NAME: series.name}
                add(c.DB_CONNECTION_COUNT, {**pool, c.SEMCONV_STATE: "used"}, levels.used, start)
                add(c.DB_CONNECTION_COUNT, {**pool, c.SEMCONV_STATE: "idle"}, levels.idle, start)
                if levels.idle_max is not None:
                    add(c.DB_CONNECTION_IDLE_MAX, pool, levels.idle_max, start)
                if levels.idle_min is not None:
                    add(c.DB_CONNECTION_IDLE_MIN, pool, levels.idle_min, start)
                if levels.max is not None:
                    add(c.DB_CONNECTION_MAX, pool, levels.max, start)
                add(c.DB_CONNECTION_PENDING_REQUESTS, pool, levels.pending, start)
                add(c.DB_CONNECTION_TIMEOUTS, pool, ledger.timeouts, start)
                add(c.DB_CONNECTION_CREATE_TIME, pool, ledger.connect[c.CONNECT_OK], start)
                add(c.DB_CONNECTION_WAIT_TIME, pool, ledger.wait[c.OUTCOME_ACQUIRED], start)
                add(c.DB_CONNECTION_USE_TIME, pool, ledger.use, start)
        return out

    def produce(self, reader: MetricReader) -> list[Metric]:
        """The metrics for one collection by ``reader``, in the temporality it prefers."""
        readings = self._registry.read()
        now_ns = time.time_ns()
        points = self.points(readings)
        temporality_of = temporalities(reader)
        with self._lock:
            state = self._states.setdefault(id(reader), _ReaderState())
            previous = state.previous
            seen: dict[PointKey, int | HistogramSnapshot] = {}
            metrics: list[Metric] = []
            for spec in c.ALL_METRICS:
                series_points = points[spec.name]
                if not series_points:
                    continue
                delta = temporality_of[spec.instrument] == AggregationTemporality.DELTA
                data = self._data(
                    spec,
                    points=series_points,
                    delta=delta,
                    state=state,
                    previous=previous,
                    seen=seen,
                    now_ns=now_ns,
                )
                metrics.append(Metric(spec.name, spec.description, spec.unit, data))
            state.previous = seen
            state.last_ns = now_ns
        return metrics

    def _data(
        self,
        spec: c.MetricSpec,
        *,
        points: list[Any],
        delta: bool,
        state: _ReaderState,
        previous: dict[PointKey, Any],
        seen: dict[PointKey, Any],
        now_ns: int,
    ) -> Sum | Histogram:
        temporality = AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
        out: list[Any] = []
        for point in points:
            key = (spec.name, point.attributes, point.start_ns)
            seen[key] = point.value
            before = previous.get(key) if delta else None
            start = (
                max(point.start_ns, state.last_ns) if delta and key in previous else point.start_ns
            )
            attributes = dict(point.attributes)
            if spec.instrument == "histogram":
                h = _delta_histogram(point.value, before) if delta else point.value
                n = h.count
                out.append(
                    HistogramDataPoint(
                        attributes=attributes,
                        start_time_unix_nano=start,
                        time_unix_nano=now_ns,
                        count=n,
                        sum=h.total,
                        bucket_counts=list(h.counts),
                        explicit_bounds=list(h.bounds),
                        min=h.min if n else 0.0,
                        max=h.max if n else 0.0,
                    )
                )
            else:
                value = point.value - before if before is not None else point.value
                out.append(NumberDataPoint(attributes, start, now_ns, value))
        if spec.instrument == "histogram":
            return Histogram(out, temporality)
        return Sum(out, temporality, is_monotonic=spec.instrument == "counter")


def _merge(result: MetricsData | None, scope: ScopeMetrics, resource: Any) -> MetricsData:
    if result is None or not result.resource_metrics:
        return MetricsData([ResourceMetrics(resource, [scope], "")])
    first, *rest = result.resource_metrics
    merged = ResourceMetrics(first.resource, [*first.scope_metrics, scope], first.schema_url)
    return MetricsData([merged, *rest])


def readers_of(provider: MeterProvider) -> list[MetricReader]:
    """The readers registered on an SDK MeterProvider."""
    consumer = getattr(provider, "_measurement_consumer", None)
    storages = getattr(consumer, "_reader_storages", None)
    if storages is not None:
        return list(storages)
    return list(provider._sdk_config.metric_readers)  # type: ignore[attr-defined]


class Bridge:
    """Feeds poolwatch's metrics to every reader of one MeterProvider."""

    def __init__(self, producer: Producer, provider: MeterProvider, errors: ErrorLog) -> None:
        self._producer = producer
        self._provider = provider
        self._errors = errors
        self._wrapped: list[tuple[MetricReader, Callable[..., Any], Callable[..., Any]]] = []

    def attach(self) -> None:
        """Wrap the collect callback of each reader."""
        resource = self._provider._sdk_config.resource
        for reader in readers_of(self._provider):
            original = reader._collect
            if original is None:
                continue
            wrapper = self._wrap(original, resource)
            reader._collect = wrapper
            self._wrapped.append((reader, original, wrapper))

    def _wrap(self, original: Callable[..., Any], resource: Any) -> Callable[..., Any]:
        producer, errors = self._producer, self._errors

        def collect(reader: MetricReader, *args: Any, **kwargs: Any) -> MetricsData | None:
            result: MetricsData | None = original(reader, *args, **kwargs)
            try:
                metrics = producer.produce(reader)
            except Exception as error:
                errors.report("export", error)
                return result
            if not metrics:
                return result
            return _merge(result, ScopeMetrics(producer.scope, metrics, ""), resource)

        return collect

    def detach(self) -> None:
        """Restore every reader's collect callback."""
        for reader, original, wrapper in self._wrapped:
            if reader._collect is wrapper:
                reader._collect = original
        self._wrapped.clear()

    @property
    def readers(self) -> Iterable[MetricReader]:
        """Readers being fed."""
        return [reader for reader, _, _ in self._wrapped]
