"""The OpenTelemetry bridge: finished data points handed to every SDK reader at collection.

OpenTelemetry's specification has a *MetricProducer*: a source of already-aggregated
metrics that a MetricReader merges into each collection. The Python SDK does not have it
yet (opentelemetry-python issue 4768), so poolwatch attaches its producer to each reader
of the MeterProvider itself: it wraps the reader's collect callback, lets the SDK collect
as usual, and appends one ``poolwatch`` scope built from the pool ledgers and levels.

Why not observable instruments: at collection the SDK spends about 26 µs per observation
(measured on this project's machine), and a pool needs ~20 points; building the points
directly costs 2-3 µs each (half of it the SDK's own data-point objects), keeps
histograms exact (bucket counts, sum,
min, max straight from the ledger, which a histogram instrument could only approximate by
re-recording values), and still reaches every exporter — OTLP, Prometheus, console — as
ordinary sums and histograms, with the temporality each reader asks for.

Limits, documented in docs/architecture.md: Views configured on the provider do not apply
to poolwatch metrics; a reader added to the provider after ``instrument()`` is not fed.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from math import inf
from typing import Any

from opentelemetry.sdk.metrics import Exemplar, MeterProvider
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
from poolwatch._collect import Collection, Collector
from poolwatch._config import Settings
from poolwatch._ledger import Exemplar as LedgerExemplar
from poolwatch._ledger import HistogramSnapshot, LedgerSnapshot
from poolwatch._models import HostLevels, Levels
from poolwatch._registry import Series, SeriesReading
from poolwatch._safe import ErrorLog
from poolwatch._version import __version__
from poolwatch.diagnostics.process import ProcessWatcher

Attributes = dict[str, str | int]

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


PointKey = tuple[str, str, int]
"""(metric name, variant such as "used" or "timeout", the series' serial number) — one time
series. The serial, not the series' ``id()``: a series made after another is freed may get
its ``id()``, and its first delta would then be taken against the dead series' values."""


# -- data points --------------------------------------------------------------------------
# The SDK's data points are frozen dataclasses: their generated __init__ sets each field
# through object.__setattr__, about 1.0 µs for a NumberDataPoint and 1.6 µs for a
# HistogramDataPoint — half of poolwatch's collection cost per series. Filling the
# instance's __dict__ directly makes the same object (equal, same type, same fields) in
# a third of the time. Used only while the classes have exactly the fields this code
# fills; otherwise, with a future SDK, the constructors are called as usual.
_NUMBER_FIELDS = ("attributes", "start_time_unix_nano", "time_unix_nano", "value", "exemplars")
_HISTOGRAM_FIELDS = (
    "attributes",
    "start_time_unix_nano",
    "time_unix_nano",
    "count",
    "sum",
    "bucket_counts",
    "explicit_bounds",
    "min",
    "max",
    "exemplars",
)


def _fields_are(cls: type, names: tuple[str, ...]) -> bool:
    try:
        return (
            tuple(f.name for f in dataclasses.fields(cls)) == names
            and not hasattr(cls, "__slots__")
            and "__post_init__" not in vars(cls)
        )
    except TypeError:  # no longer a dataclass
        return False


FAST_POINTS = _fields_are(NumberDataPoint, _NUMBER_FIELDS) and _fields_are(
    HistogramDataPoint, _HISTOGRAM_FIELDS
)
"""Whether data points are built by filling ``__dict__`` (see above)."""


_new = object.__new__


_FAST_METRICS = (
    _fields_are(Metric, ("name", "description", "unit", "data"))
    and _fields_are(Sum, ("data_points", "aggregation_temporality", "is_monotonic"))
    and _fields_are(Histogram, ("data_points", "aggregation_temporality"))
)
"""Whether Metric, Sum and Histogram are built by filling ``__dict__`` (as data points)."""

_PROCESS_VARIANTS_CACHED = 1000
"""Attribute sets of process-view points kept between collections (endpoints come and go)."""

_DELTA = AggregationTemporality.DELTA
_CUMULATIVE = AggregationTemporality.CUMULATIVE
_SPECS = tuple((spec.name, spec.description, spec.unit, spec.instrument) for spec in c.ALL_METRICS)
_SPEC_OF = {spec[0]: spec for spec in _SPECS}


def _metric(spec: tuple[str, str, str, c.Instrument], points: list[Any], delta: bool) -> Metric:
    name, description, unit, instrument = spec
    temporality = _DELTA if delta else _CUMULATIVE
    if not _FAST_METRICS:
        data: Sum | Histogram = (
            Histogram(points, temporality)
            if instrument == "histogram"
            else Sum(points, temporality, instrument == "counter")
        )
        return Metric(name, description, unit, data)
    if instrument == "histogram":
        data = _new(Histogram)
        data.__dict__["data_points"] = points
        data.__dict__["aggregation_temporality"] = temporality
    else:
        data = _new(Sum)
        data.__dict__["data_points"] = points
        data.__dict__["aggregation_temporality"] = temporality
        data.__dict__["is_monotonic"] = instrument == "counter"
    metric: Metric = _new(Metric)
    fields = metric.__dict__
    fields["name"] = name
    fields["description"] = description
    fields["unit"] = unit
    fields["data"] = data
    return metric


def _number_point(
    attributes: dict[str, str | int], start: int, now: int, value: int
) -> NumberDataPoint:
    if not FAST_POINTS:
        return NumberDataPoint(attributes, start, now, value)
    point: NumberDataPoint = _new(NumberDataPoint)
    fields = point.__dict__
    fields["attributes"] = attributes
    fields["start_time_unix_nano"] = start
    fields["time_unix_nano"] = now
    fields["value"] = value
    fields["exemplars"] = ()  # Sequence[Exemplar]: one shared empty tuple, no allocation
    return point


def _server(host: HostLevels) -> tuple[tuple[str, str | int], ...]:
    return ((c.SERVER_ADDRESS, host.address), (c.SERVER_PORT, host.port))


def _by_host(hosts: tuple[HostLevels, ...]) -> list[HostLevels]:
    """One entry per server (pools of one series may share servers), in a stable order."""
    merged: dict[tuple[str, int], HostLevels] = {}
    for host in hosts:
        key = (host.address, host.port)
        seen = merged.get(key)
        merged[key] = (
            host
            if seen is None
            else seen._replace(
                used=seen.used + host.used,
                idle=seen.idle + host.idle,
                pending=seen.pending + host.pending,
            )
        )
    return [merged[key] for key in sorted(merged)]


def _merged(histograms: Iterable[HistogramSnapshot]) -> HistogramSnapshot | None:
    """The sum of histograms with the same bounds (lifetimes of every close reason)."""
    merged: HistogramSnapshot | None = None
    for h in histograms:
        if merged is None:
            merged = h
            continue
        merged = HistogramSnapshot(
            h.bounds,
            tuple(a + b for a, b in zip(merged.counts, h.counts, strict=True)),
            merged.total + h.total,
            min(merged.min, h.min),
            max(merged.max, h.max),
            merged.observations + h.observations,
        )
    return merged


class _ReaderState:
    """What one reader saw at its previous collection, for delta temporality."""

    def __init__(self, reader: MetricReader) -> None:
        self.last_ns = 0
        self.previous: dict[PointKey, int | HistogramSnapshot] = {}
        self.series: set[int] = set()
        """Serials of the series its previous collection had."""
        self.delta = {  # a reader's preferences are fixed when it is made
            kind: temporality == AggregationTemporality.DELTA
            for kind, temporality in temporalities(reader).items()
        }


def _delta_histogram(now: HistogramSnapshot, before: HistogramSnapshot) -> HistogramSnapshot:
    counts = tuple(a - b for a, b in zip(now.counts, before.counts, strict=True))
    bounds = now.bounds
    filled = [i for i, n in enumerate(counts) if n]
    if not filled:
        return HistogramSnapshot(bounds, counts, 0.0, inf, -inf, 0)
    # The interval's exact min/max are not kept; bound them by the buckets that filled.
    low = bounds[filled[0] - 1] if filled[0] > 0 else now.min
    high = bounds[filled[-1]] if filled[-1] < len(bounds) else now.max
    return HistogramSnapshot(
        bounds,
        counts,
        now.total - before.total,
        max(low, now.min),
        min(high, now.max),
        now.observations - before.observations,
    )


class _Collection:
    """The data points of one collection for one reader, by metric."""

    def __init__(
        self,
        now_ns: int,
        delta: dict[c.Instrument, bool],
        state: _ReaderState,
        cache: dict[tuple[int, str, str], Attributes],
    ) -> None:
        self.now_ns = now_ns
        self.delta = delta
        self.state = state
        self.cache = cache
        """Exported attributes by (series serial, metric, variant): a series' never change."""
        self.seen: dict[PointKey, int | HistogramSnapshot] = {}
        self.series: set[int] = set()
        """Serials of the series in this collection."""
        self.points: defaultdict[str, list[Any]] = defaultdict(list)

    def _attributes(
        self,
        series: Series,
        spec: c.MetricSpec,
        variant: str,
        extra: tuple[tuple[str, str | int], ...] = (),
    ) -> dict[str, str | int]:
        # Attributes of a series never change: built once, reused at every collection.
        key = (series.serial, spec.name, variant)
        attributes = self.cache.get(key)
        if attributes is None:
            if spec.name.startswith("db."):
                attributes = {c.SEMCONV_POOL_NAME: series.name}
            elif spec.name.startswith("http."):
                attributes = {c.POOL_NAME: series.name}
                attributes.update(series.attributes)
            else:
                attributes = {c.POOL_NAME: series.name, c.POOL_KIND: series.kind}
                attributes.update(series.attributes)
            if spec.attributes:
                attributes[spec.attributes[0]] = variant.split(" ", 1)[0]
            attributes.update(extra)
            self.cache[key] = attributes
        return attributes

    def _previous(
        self, spec: c.MetricSpec, series: Series, variant: str, value: int | HistogramSnapshot
    ) -> tuple[int, int | HistogramSnapshot | None]:
        """Start time of a point and, for a delta reader, what it saw last time.

        Also remembers ``value`` for this reader's next delta.
        """
        if not self.delta[spec.instrument]:
            return series.created_ns, None
        key = (spec.name, variant, series.serial)
        self.seen[key] = value
        if series.serial in self.state.series:
            # Seen at the previous collection: this interval starts where that one ended. A
            # point new since then (the first timeout, say) was zero at its start.
            return max(series.created_ns, self.state.last_ns), self.state.previous.get(key)
        return series.created_ns, None

    def number(
        self,
        spec: c.MetricSpec,
        series: Series,
        value: int,
        variant: str = "",
        host: HostLevels | None = None,
    ) -> None:
        """Add one sum point; ``host`` adds that server's attributes (variant names it)."""
        attributes = self.cache.get((series.serial, spec.name, variant))
        if attributes is None:
            extra = _server(host) if host is not None else ()
            attributes = self._attributes(series, spec, variant, extra)
        start = series.created_ns
        if self.delta[spec.instrument]:
            start, before = self._previous(spec, series, variant, value)
            if isinstance(before, int):
                value -= before
        # _number_point, inlined: this runs for every point of every series (measured)
        if FAST_POINTS:
            point = _new(NumberDataPoint)
            fields = point.__dict__
            fields["attributes"] = attributes
            fields["start_time_unix_nano"] = start
            fields["time_unix_nano"] = self.now_ns
            fields["value"] = value
            fields["exemplars"] = ()  # Sequence[Exemplar]: one shared empty tuple, no allocation
        else:
            point = NumberDataPoint(attributes, start, self.now_ns, value)
        self.points[spec.name].append(point)

    def process_number(
        self,
        spec: c.MetricSpec,
        value: int,
        variant: str,
        attributes: dict[str, str | int],
        created_ns: int,
    ) -> None:
        """Add one sum point that belongs to no pool (the process view, a server's limit)."""
        start = created_ns
        if self.delta[spec.instrument]:
            key = (spec.name, variant, 0)
            self.seen[key] = value
            before = self.state.previous.get(key)
            if isinstance(before, int):
                start = max(created_ns, self.state.last_ns)
                value -= before
        self.points[spec.name].append(_number_point(attributes, start, self.now_ns, value))

    def histogram(
        self,
        spec: c.MetricSpec,
        series: Series,
        value: HistogramSnapshot,
        variant: str = "",
        exemplars: tuple[LedgerExemplar, ...] = (),
    ) -> None:
        """Add one histogram point, with the ``exemplars`` this reader has not seen yet."""
        attributes = self.cache.get((series.serial, spec.name, variant))
        if attributes is None:
            attributes = self._attributes(series, spec, variant)
        start = series.created_ns
        if self.delta[spec.instrument]:
            start, before = self._previous(spec, series, variant, value)
            if isinstance(before, HistogramSnapshot):
                value = _delta_histogram(value, before)
        n = value.observations
        low, high = (value.min, value.max) if n else (0.0, 0.0)
        if FAST_POINTS:
            point = _new(HistogramDataPoint)
            fields = point.__dict__
            fields["attributes"] = attributes
            fields["start_time_unix_nano"] = start
            fields["time_unix_nano"] = self.now_ns
            fields["count"] = n
            fields["sum"] = value.total
            fields["bucket_counts"] = value.counts
            fields["explicit_bounds"] = value.bounds
            fields["min"] = low
            fields["max"] = high
            # Sequence[Exemplar]: one shared empty tuple when none, no allocation
            fields["exemplars"] = self._exemplars(exemplars) if exemplars else ()
        else:
            point = HistogramDataPoint(
                attributes,
                start,
                self.now_ns,
                n,
                value.total,
                value.counts,
                value.bounds,
                low,
                high,
                self._exemplars(exemplars) if exemplars else (),
            )
        self.points[spec.name].append(point)

    def _exemplars(self, kept: tuple[LedgerExemplar, ...]) -> tuple[Exemplar, ...]:
        """The ledger's exemplars newer than this reader's previous collection: each slow
        wait's or connect's span links its point once per reader."""
        since = self.state.last_ns
        return tuple(
            Exemplar(None, e.value, e.time_unix_nano, e.span_id, e.trace_id)
            for e in kept
            if e.time_unix_nano > since
        )

    def metrics(self) -> list[Metric]:
        """The collection as OpenTelemetry metrics (in the order their points came)."""
        delta = self.delta
        return [
            _metric(spec, points, delta[spec[3]])
            for spec, points in ((_SPEC_OF[name], points) for name, points in self.points.items())
            if points
        ]


class Producer:
    """Builds poolwatch's metrics from a collection round's readings, per reader and
    temporality.

    Points that only matter once something happened — waits that timed out or failed,
    failed connects, closes of a given reason, lifetimes — appear from their first
    occurrence; the others are always present.
    """

    def __init__(self, collector: Collector, settings: Settings, errors: ErrorLog) -> None:
        self._collector = collector
        self._settings = settings
        self._errors = errors
        self._lock = threading.Lock()
        self._states: dict[int, _ReaderState] = {}
        self._cache: dict[tuple[int, str, str], Attributes] = {}
        """Exported attributes by (series serial, metric, variant), kept while the series is."""
        self._cached_series: set[int] = set()
        self.scope = InstrumentationScope(c.SCOPE_NAME, __version__)
        self.process: ProcessWatcher | None = None
        """The process view, when on: its latest reading is exported with every collection."""
        self._process_attributes: dict[str, dict[str, str | int]] = {}
        self._created_ns = time.time_ns()
        self._servers: list[tuple[str, Attributes, int]] = [
            (f"{address} {port}", {c.SERVER_ADDRESS: address, c.SERVER_PORT: port}, limit)
            for (address, port), limit in settings.server_limits.items()
        ]
        """(variant, attributes, limit) of each declared server: settings never change."""

    def reset(self) -> None:
        """Forget every reader's previous collection (a forked child starts over)."""
        self._lock = threading.Lock()
        self._states = {}

    def _add(self, out: _Collection, reading: SeriesReading, collection: Collection) -> None:
        series, levels, ledger = reading.series, reading.levels, reading.ledger
        hosts = _by_host(levels.hosts) if levels.hosts else []
        self._add_levels(out, series, levels, hosts)
        for outcome, wait in ledger.wait.items():
            if outcome == c.OUTCOME_ACQUIRED or wait.observations:
                exemplars = ledger.exemplars.get(f"wait {outcome}", ())
                out.histogram(c.WAIT_DURATION, series, wait, outcome, exemplars)
        out.histogram(c.USE_DURATION, series, ledger.use)
        for outcome, connect in ledger.connect.items():
            if outcome == c.CONNECT_OK or connect.observations:
                exemplars = ledger.exemplars.get(f"connect {outcome}", ())
                out.histogram(c.CONNECT_DURATION, series, connect, outcome, exemplars)
        for reason, lifetimes in ledger.lifetime.items():
            out.histogram(c.CONNECTION_LIFETIME, series, lifetimes, reason)
        out.number(c.TIMEOUTS, series, ledger.timeouts)
        for reason, closed in ledger.closed.items():
            if closed:
                out.number(c.CONNECTIONS_CLOSED, series, closed, reason)
        out.number(c.LEAKS, series, ledger.leaks)
        out.number(c.LEAKS_ACTIVE, series, ledger.leaks_active)
        out.number(c.CHECKOUTS_REUSED, series, ledger.reused)
        for antipattern in collection.antipatterns(series.serial):
            out.number(c.ANTIPATTERNS_DETECTED, series, 1, antipattern.name)
            out.number(c.ANTIPATTERNS_ACTIVE, series, int(antipattern.active), antipattern.name)
        if not self._settings.semconv:
            return
        family = series.adapter.family
        if family == "database":
            self._add_database(out, series, levels, ledger)
        elif family == "http":
            self._add_http(out, series, levels, ledger, hosts)

    @staticmethod
    def _add_levels(
        out: _Collection, series: Series, levels: Levels, hosts: list[HostLevels]
    ) -> None:
        if hosts:  # a pool spanning servers: its connections per server
            for host in hosts:
                where = f" {host.address}:{host.port}"
                out.number(c.CONNECTIONS, series, host.used, c.STATE_USED + where, host)
                out.number(c.CONNECTIONS, series, host.idle, c.STATE_IDLE + where, host)
        else:
            out.number(c.CONNECTIONS, series, levels.used, c.STATE_USED)
            out.number(c.CONNECTIONS, series, levels.idle, c.STATE_IDLE)
        if levels.max is not None:
            out.number(c.CONNECTIONS_MAX, series, levels.max)
        if levels.idle_max is not None:
            out.number(c.CONNECTIONS_IDLE_MAX, series, levels.idle_max)
        if hosts and sum(host.pending for host in hosts) == levels.pending:
            for host in hosts:  # every waiting caller is waiting for one server
                where = f" {host.address}:{host.port}"
                out.number(c.PENDING_REQUESTS, series, host.pending, where, host)
        else:
            out.number(c.PENDING_REQUESTS, series, levels.pending)

    @staticmethod
    def _add_database(
        out: _Collection, series: Series, levels: Levels, ledger: LedgerSnapshot
    ) -> None:
        out.number(c.DB_CONNECTION_COUNT, series, levels.used, c.STATE_USED)
        out.number(c.DB_CONNECTION_COUNT, series, levels.idle, c.STATE_IDLE)
        if levels.idle_max is not None:
            out.number(c.DB_CONNECTION_IDLE_MAX, series, levels.idle_max)
        if levels.idle_min is not None:
            out.number(c.DB_CONNECTION_IDLE_MIN, series, levels.idle_min)
        if levels.max is not None:
            out.number(c.DB_CONNECTION_MAX, series, levels.max)
        out.number(c.DB_CONNECTION_PENDING_REQUESTS, series, levels.pending)
        out.number(c.DB_CONNECTION_TIMEOUTS, series, ledger.timeouts)
        out.histogram(c.DB_CONNECTION_CREATE_TIME, series, ledger.connect[c.CONNECT_OK])
        out.histogram(c.DB_CONNECTION_WAIT_TIME, series, ledger.wait[c.OUTCOME_ACQUIRED])
        out.histogram(c.DB_CONNECTION_USE_TIME, series, ledger.use)

    @staticmethod
    def _add_http(
        out: _Collection,
        series: Series,
        levels: Levels,
        ledger: LedgerSnapshot,
        hosts: list[HostLevels],
    ) -> None:
        # server.address and server.port are required on open_connections: a pool of one
        # server has them as series attributes, a pool spanning servers per host.
        spec = c.HTTP_OPEN_CONNECTIONS
        if hosts:
            for host in hosts:
                where = f" {host.address}:{host.port}"
                out.number(spec, series, host.used, c.HTTP_STATE_ACTIVE + where, host)
                out.number(spec, series, host.idle, c.STATE_IDLE + where, host)
        elif c.SERVER_ADDRESS in series.attributes:
            out.number(spec, series, levels.used, c.HTTP_STATE_ACTIVE)
            out.number(spec, series, levels.idle, c.STATE_IDLE)
        lifetimes = _merged(ledger.lifetime.values())
        if lifetimes is not None:
            out.histogram(c.HTTP_CONNECTION_DURATION, series, lifetimes)
        out.histogram(c.HTTP_TIME_IN_QUEUE, series, ledger.wait[c.OUTCOME_ACQUIRED])

    def _add_process(self, out: _Collection, watcher: ProcessWatcher) -> None:
        view, start = watcher.latest, watcher.created_ns
        if view is None:
            return
        if view.file_descriptors is not None:
            out.process_number(c.PROCESS_FILE_DESCRIPTORS, view.file_descriptors, "", {}, start)
        if view.file_descriptors_max is not None:
            out.process_number(
                c.PROCESS_FILE_DESCRIPTORS_MAX, view.file_descriptors_max, "", {}, start
            )
        cache = self._process_attributes
        for group in view.connections:
            variant = f"{group.state} {group.owner} {group.address} {group.port}"
            attributes = cache.get(variant)
            if attributes is None:
                attributes = {c.CONNECTION_STATE: group.state, c.OWNER: group.owner}
                if group.address is not None:
                    attributes[c.SERVER_ADDRESS] = group.address
                if group.port is not None:
                    attributes[c.SERVER_PORT] = group.port
                if len(cache) < _PROCESS_VARIANTS_CACHED:
                    cache[variant] = attributes
            out.process_number(c.PROCESS_CONNECTIONS, group.count, variant, attributes, start)

    def produce(self, reader: MetricReader) -> list[Metric]:
        """The metrics for one collection by ``reader``, in the temporality it prefers."""
        collection = self._collector.collect()
        with self._lock:
            state = self._states.get(id(reader))
            if state is None:
                state = self._states[id(reader)] = _ReaderState(reader)
            out = _Collection(time.time_ns(), state.delta, state, self._cache)
            for reading in collection.readings:
                out.series.add(reading.series.serial)
                self._add(out, reading, collection)
            if self._cached_series - out.series:  # series removed: their attributes go too
                self._cache = {k: v for k, v in self._cache.items() if k[0] in out.series}
            self._cached_series = out.series
            if self.process is not None:
                self._add_process(out, self.process)
            for variant, attributes, limit in self._servers:
                out.process_number(
                    c.SERVER_CONNECTIONS_LIMIT, limit, variant, attributes, self._created_ns
                )
            state.previous = out.seen
            state.series = out.series
            state.last_ns = out.now_ns
            return out.metrics()


_FAST_ENVELOPES = (
    _fields_are(ResourceMetrics, ("resource", "scope_metrics", "schema_url"))
    and _fields_are(ScopeMetrics, ("scope", "metrics", "schema_url"))
    and _fields_are(MetricsData, ("resource_metrics",))
)
"""Whether the three objects wrapping a collection are built by filling ``__dict__``."""


def _scope_metrics(scope: InstrumentationScope, metrics: list[Metric]) -> ScopeMetrics:
    if not _FAST_ENVELOPES:
        return ScopeMetrics(scope, metrics, "")
    made: ScopeMetrics = _new(ScopeMetrics)
    made.__dict__.update(scope=scope, metrics=metrics, schema_url="")
    return made


def _merge(result: MetricsData | None, scope: ScopeMetrics, resource: Any) -> MetricsData:
    if result is None or not result.resource_metrics:
        resource_metrics, schema_url, scopes, rest = resource, "", [scope], []
    else:
        first, *rest = result.resource_metrics
        resource_metrics, schema_url = first.resource, first.schema_url
        scopes = [*first.scope_metrics, scope]
    if not _FAST_ENVELOPES:
        merged = ResourceMetrics(resource_metrics, scopes, schema_url)
        return MetricsData([merged, *rest])
    made: ResourceMetrics = _new(ResourceMetrics)
    made.__dict__.update(resource=resource_metrics, scope_metrics=scopes, schema_url=schema_url)
    data: MetricsData = _new(MetricsData)
    data.__dict__["resource_metrics"] = [made, *rest]
    return data


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
            return _merge(result, _scope_metrics(producer.scope, metrics), resource)

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
