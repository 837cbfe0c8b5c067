"""Collection time: ``reader.get_metrics_data()`` with 1 to 10,000 live SQLAlchemy pools.

Each case instruments poolwatch with an ``InMemoryMetricReader`` (``max_pools=20000`` so
that nothing folds into the overflow series, except in the *cap* case), creates the
engines (in-memory SQLite, ``QueuePool``), checks each out and in once, collects once to
warm up, then times ``get_metrics_data()`` with ``time.perf_counter`` — per round, as many
collections back to back as fill 2 ms (one, for the big cases), divided. Three layouts:

* *one call site* — every engine is created by the same line: they aggregate into one
  series with many pool instances (levels are still read from every pool);
* *distinct names* — each engine is named with ``poolwatch.track(engine, name=f"p{i}")``:
  one series, and its 12 data points (the poolwatch family; the semantic-convention
  mirrors are off by default), per pool;
* *names, cap 200* — the same under the default ``max_pools``: 200 series, and every
  further pool folded into the ``_overflow`` series (what an application with thousands of
  distinct pools gets unless it raises the cap).

Cases run one after another (poolwatch has one instrumentation per process, so two pool
counts cannot share it); inside a case, a GC-enabled and a GC-disabled collection are
interleaved round by round. GC-enabled is the figure that counts: a collection allocates
tens of thousands of objects, which triggers the cyclic collector, and a full collection
walks the whole heap — here the engines themselves — so the figure depends on the heap as
well as on poolwatch. The GC-disabled figure isolates poolwatch's own work.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import sqlalchemy
from _common import Summary, heading, interleave, summarize, table, verdict
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, MetricsData
from sqlalchemy.pool import QueuePool

import poolwatch

TARGET_US_PER_POOL = 20.0
URL = "sqlite://"
ONE_SITE = "one call site"
NAMED = "distinct names"
CAPPED = "names, cap 200"
"""Distinct names under the default ``max_pools`` (200): the rest fold into ``_overflow``."""


@dataclass(frozen=True)
class Case:
    """One layout and pool count, measured over ``rounds`` rounds."""

    layout: str
    pools: int
    rounds: int


FULL_CASES = (
    Case(ONE_SITE, 1, 15),
    Case(ONE_SITE, 100, 15),
    Case(ONE_SITE, 10_000, 7),
    Case(NAMED, 100, 15),
    Case(NAMED, 200, 11),
    Case(NAMED, 10_000, 3),
    Case(CAPPED, 10_000, 3),
)
QUICK_CASES = (
    Case(ONE_SITE, 1, 5),
    Case(ONE_SITE, 100, 5),
    Case(ONE_SITE, 1_000, 3),
    Case(NAMED, 100, 5),
    Case(NAMED, 200, 3),
)


@dataclass(frozen=True)
class CaseResult:
    """What one case measured."""

    case: Case
    gc_on: Summary
    """Seconds per collection, GC enabled."""
    gc_off: Summary
    """Seconds per collection, GC disabled."""
    series: int
    points: int
    setup_us_per_pool: float
    """Creating, tracking and checking out one engine, as seen while building the case."""
    process_view: float | None = None
    """Seconds of one process-view reading with the case's pools (None without psutil)."""


def _engine() -> Any:
    return sqlalchemy.create_engine(URL, poolclass=QueuePool, pool_size=5)


def engines_one_site(count: int) -> list[Any]:
    """``count`` engines created by one line of code: one poolwatch series."""
    engines = [_engine() for _ in range(count)]
    for engine in engines:
        engine.pool.connect().close()
    return engines


def engines_named(count: int) -> list[Any]:
    """``count`` engines, each its own series through ``poolwatch.track(name=...)``."""
    engines = []
    for i in range(count):
        engine = _engine()
        poolwatch.track(engine, name=f"p{i}")
        engine.pool.connect().close()
        engines.append(engine)
    return engines


def dispose_all(engines: list[Any]) -> None:
    """Dispose of every engine and drop the references."""
    for engine in engines:
        engine.dispose()
    engines.clear()


BATCH_SECONDS = 0.002
"""A round times back-to-back collections for at least this long (one, for big cases): a
20 µs collection timed alone is mostly timer and cache noise."""


def batch_size(reader: InMemoryMetricReader) -> int:
    """Collections per round: enough to fill ``BATCH_SECONDS``, from one timed collection."""
    start = perf_counter()
    reader.get_metrics_data()
    once = perf_counter() - start
    return max(1, min(1000, int(BATCH_SECONDS / max(once, 1e-9))))


def timed_collection(reader: InMemoryMetricReader, *, gc_enabled: bool, batch: int = 1) -> float:
    """Seconds per ``get_metrics_data()``, over ``batch`` collections back to back."""
    if not gc_enabled:
        gc.disable()
    try:
        start = perf_counter()
        for _ in range(batch):
            reader.get_metrics_data()
        return (perf_counter() - start) / batch
    finally:
        gc.enable()


def count_points(data: MetricsData | None) -> tuple[int, int]:
    """(distinct ``pool.name`` values, data points) of poolwatch's scope."""
    names: set[object] = set()
    points = 0
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            if sm.scope.name != "poolwatch":
                continue
            for metric in sm.metrics:
                for point in metric.data.data_points:
                    points += 1
                    names.add((point.attributes or {}).get("pool.name"))
    names.discard(None)
    return len(names), points


def run_case(case: Case) -> CaseResult:
    """Build the case's pools under a fresh instrumentation, then time collections."""
    gc.collect()  # or instrument()'s heap walk finds a previous case's unreachable engines
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    logging.getLogger("poolwatch").setLevel(logging.ERROR)  # one call site: a client per request
    # The process view is off here: its reading runs on poolwatch's thread every 10 s, not
    # in a collection, and is timed on its own below (view ms).
    if case.layout == CAPPED:
        handle = poolwatch.instrument(meter_provider=provider, process_view="off")
    else:
        handle = poolwatch.instrument(meter_provider=provider, max_pools=20_000, process_view="off")
    engines: list[Any] = []
    try:
        build = engines_one_site if case.layout == ONE_SITE else engines_named
        start = perf_counter()
        engines = build(case.pools)
        setup = (perf_counter() - start) / case.pools * 1e6
        series, points = count_points(reader.get_metrics_data())
        batch = batch_size(reader)
        runs: dict[str, Callable[[], float]] = {
            "on": lambda: timed_collection(reader, gc_enabled=True, batch=batch),
            "off": lambda: timed_collection(reader, gc_enabled=False, batch=batch),
        }
        samples = interleave(runs, case.rounds)
        view = time_process_view(handle)
    finally:
        dispose_all(engines)
        poolwatch.uninstrument()
        provider.shutdown()
    on, off = summarize(samples["on"]), summarize(samples["off"])
    return CaseResult(case, on, off, series, points, setup, view)


def time_process_view(handle: poolwatch.Instrumentation, rounds: int = 5) -> float | None:
    """Median seconds of one process-view reading (psutil's scan of descriptors and TCP
    connections, and every pool's sockets), as poolwatch's thread takes it; None without
    psutil."""
    from poolwatch.diagnostics.process import ProcessWatcher

    try:
        watcher = ProcessWatcher(handle._registry.pool_sockets, handle._errors)
    except ImportError:  # psutil not installed
        return None
    samples = []
    for _ in range(rounds):
        start = perf_counter()
        if watcher.refresh() is None:
            raise RuntimeError("the process view could not be read")
        samples.append(perf_counter() - start)
    return summarize(samples).median


def run_collection(cases: tuple[Case, ...]) -> list[CaseResult]:
    """Every case, in order."""
    return [run_case(case) for case in cases]


def render_collection(results: list[CaseResult]) -> str:
    """The collection-time table and the verdict per case."""
    single = next((r.gc_on.median for r in results if r.case.pools == 1), None)
    rows = [_row(r, single) for r in results]
    headers = [
        "layout",
        "pools",
        "series",
        "points",
        "rounds",
        "ms/collect",
        "µs/pool",
        "marginal",
        "GC off",
        "setup",
        "view ms",
        f"<= {TARGET_US_PER_POOL:.0f} µs/pool",
    ]
    return "\n".join(
        [
            heading("Collection: InMemoryMetricReader.get_metrics_data() with N live pools"),
            "medians, GC enabled unless said; µs/pool = collection / pools (the verdict uses it);",
            "marginal = (collection - 1-pool collection) / (pools - 1) µs; GC off = µs/pool with",
            "the collector disabled; setup = create + track + one checkout, µs per engine;",
            "view ms = one process-view reading (poolwatch's thread, every 10 s; not in a",
            "collection): psutil's scan and every pool's sockets",
            table(headers, rows),
        ]
    )


def _row(r: CaseResult, single: float | None) -> list[str]:
    pools = r.case.pools
    per_pool = r.gc_on.median / pools * 1e6
    marginal = "-"
    if single is not None and pools > 1:
        marginal = f"{(r.gc_on.median - single) / (pools - 1) * 1e6:.1f}"
    return [
        r.case.layout,
        f"{pools:,}",
        f"{r.series:,}",
        f"{r.points:,}",
        str(r.case.rounds),
        f"{r.gc_on.median * 1e3:.2f}",
        f"{per_pool:.1f}",
        marginal,
        f"{r.gc_off.median / pools * 1e6:.1f}",
        f"{r.setup_us_per_pool:.0f}",
        "-" if r.process_view is None else f"{r.process_view * 1e3:.2f}",
        verdict(per_pool <= TARGET_US_PER_POOL),
    ]
