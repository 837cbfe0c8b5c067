"""Hot path: the cost of one SQLAlchemy ``QueuePool`` checkout+checkin, and what is deferred.

Variants, each timed in this process on its own engine over one SQLite *file* database in a
temporary directory (``QueuePool``, ``pool_size=5``):

* ``bare`` — no instrumentation at all;
* ``poolwatch`` — ``poolwatch.instrument(meter_provider=...)`` with an
  ``InMemoryMetricReader``, the engine created after ``instrument()``;
* ``+ leak stacks`` — the same with ``leak_stacks="always"``: the borrower's stack captured
  at every checkout (by default only a pool that has leaked pays this);
* ``contrib`` — ``opentelemetry-instrumentation-sqlalchemy``:
  ``SQLAlchemyInstrumentor().instrument(engine=..., meter_provider=..., enable_commenter=False)``,
  which records ``db.client.connections.usage`` from pool events (four ``UpDownCounter.add``
  calls per checkout+checkin).

Each round sets a variant up, warms it up, times ``ops`` calls of ``pool.connect().close()``
with ``time.perf_counter`` and tears the instrumentation down again (both poolwatch and the
contrib package restore everything they patched), so all variants share one process and one
interpreter state. The garbage collector stays enabled: a checkout allocates little and
leaves no cycles, and the application's real hot path runs with it enabled.

"Added" figures are medians of per-round paired differences (variant minus bare in the same
round), which cancels drift that spans a round.

The deferred side: poolwatch's hot path only appends one wait and one use time to lists;
``Ledger.drain()`` (and ``Ledger.snapshot()``, which drains first) buckets them on the
exporter's thread at collection time. That cost is timed per pending observation.
"""

from __future__ import annotations

import gc
import random
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from time import perf_counter
from typing import Any, Protocol

import sqlalchemy
from _common import (
    Summary,
    heading,
    interleave,
    paired_differences,
    summarize,
    table,
    verdict,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from sqlalchemy.pool import Pool, QueuePool

import poolwatch
from poolwatch._ledger import Ledger

CONTRIB = "opentelemetry.instrumentation.sqlalchemy"
TARGET_ADDED_US = 1.0
TARGET_ADDED_PCT = 15.0
TARGET_RATIO = 10.0


@dataclass(frozen=True)
class HotPathConfig:
    """How much to measure."""

    rounds: int = 21
    ops: int = 3000
    warmup: int = 300
    drain_rounds: int = 11


class Variant(Protocol):
    """One way of running a pool: set up, check it really measured, tear down."""

    def start(self, url: str) -> Pool: ...

    def check(self, ops: int) -> None: ...

    def stop(self) -> None: ...


def _engine(url: str) -> Any:
    return sqlalchemy.create_engine(url, poolclass=QueuePool, pool_size=5)


class Bare:
    """No instrumentation."""

    def __init__(self) -> None:
        self._engine: Any = None

    def start(self, url: str) -> Pool:
        self._engine = _engine(url)
        pool: Pool = self._engine.pool
        return pool

    def check(self, ops: int) -> None:
        pass

    def stop(self) -> None:
        self._engine.dispose()
        self._engine = None


class WithPoolwatch(Bare):
    """poolwatch instrumented before the engine is created."""

    def __init__(self, **settings: Any) -> None:
        super().__init__()
        self._provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
        self._settings = settings

    def start(self, url: str) -> Pool:
        gc.collect()  # or instrument()'s heap walk tracks unreachable engines of past rounds
        poolwatch.instrument(meter_provider=self._provider, **self._settings)
        return super().start(url)

    def check(self, ops: int) -> None:
        checkouts = sum(s.checkouts for s in poolwatch.pools() if s.kind == "sqlalchemy")
        if checkouts < ops:
            raise RuntimeError(f"poolwatch saw {checkouts} checkouts of {ops}: not hooked")

    def stop(self) -> None:
        super().stop()
        poolwatch.uninstrument()


class WithContrib(Bare):
    """opentelemetry-instrumentation-sqlalchemy on the engine."""

    def __init__(self) -> None:
        super().__init__()
        self._reader = InMemoryMetricReader()
        self._provider = MeterProvider(metric_readers=[self._reader])
        self._instrumentor: Any = import_module(CONTRIB).SQLAlchemyInstrumentor()

    def start(self, url: str) -> Pool:
        pool = super().start(url)
        self._instrumentor.instrument(
            engine=self._engine,
            meter_provider=self._provider,
            enable_commenter=False,
            raise_exception_on_conflict=True,
        )
        return pool

    def check(self, ops: int) -> None:
        data = self._reader.get_metrics_data()
        names = {
            metric.name
            for rm in (data.resource_metrics if data else [])
            for sm in rm.scope_metrics
            for metric in sm.metrics
        }
        if "db.client.connections.usage" not in names:
            raise RuntimeError("the contrib instrumentation recorded no connection usage")

    def stop(self) -> None:
        self._instrumentor.uninstrument()
        super().stop()


def contrib_refusal() -> str | None:
    """Why the contrib instrumentation cannot run here, or None when it can."""
    try:
        module = import_module(CONTRIB)
        dependencies = import_module("opentelemetry.instrumentation.dependencies")
    except ImportError:
        return "opentelemetry-instrumentation-sqlalchemy is not installed"
    wanted = module.SQLAlchemyInstrumentor().instrumentation_dependencies()
    conflict = dependencies.get_dependency_conflicts(wanted)
    if conflict is None:
        return None
    return f"it refuses SQLAlchemy {sqlalchemy.__version__} (needs {', '.join(wanted)})"


def cycle(pool: Pool, ops: int) -> float:
    """Seconds for ``ops`` checkouts+checkins."""
    connect = pool.connect
    start = perf_counter()
    for _ in range(ops):
        connect().close()
    return perf_counter() - start


def measure(variant: Variant, url: str, config: HotPathConfig) -> float:
    """Microseconds per checkout+checkin for one round of ``variant``."""
    pool = variant.start(url)
    try:
        cycle(pool, config.warmup)
        elapsed = cycle(pool, config.ops)
        variant.check(config.ops)
    finally:
        variant.stop()
    return elapsed / config.ops * 1e6


@dataclass(frozen=True)
class HotPathResult:
    """Per-variant microseconds per checkout+checkin, and added cost over bare."""

    per_op: dict[str, Summary]
    added: dict[str, Summary]
    contrib_refusal: str | None


def run_hot_path(config: HotPathConfig) -> HotPathResult:
    """Time every available variant, interleaved round by round."""
    refusal = contrib_refusal()
    variants: dict[str, Variant] = {
        "bare": Bare(),
        "poolwatch": WithPoolwatch(),
        # what a pool pays once it has leaked (leak_stacks="auto"), or always with "always"
        "+ leak stacks": WithPoolwatch(leak_stacks="always"),
    }
    if refusal is None:
        variants["contrib"] = WithContrib()
    with tempfile.TemporaryDirectory(prefix="poolwatch-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        runs: dict[str, Callable[[], float]] = {
            name: _bind(variant, url, config) for name, variant in variants.items()
        }
        samples = interleave(runs, config.rounds)
    bare = samples["bare"]
    added = {
        name: summarize(paired_differences(values, bare))
        for name, values in samples.items()
        if name != "bare"
    }
    per_op = {name: summarize(values) for name, values in samples.items()}
    return HotPathResult(per_op, added, refusal)


def _bind(variant: Variant, url: str, config: HotPathConfig) -> Callable[[], float]:
    return lambda: measure(variant, url, config)


def render_hot_path(result: HotPathResult, config: HotPathConfig) -> str:
    """The hot-path table and the verdicts."""
    bare = result.per_op["bare"].median
    rows = [
        [name, f"{s.median:.2f}", s.spread(), _added_cell(result, name, bare)]
        for name, s in result.per_op.items()
    ]
    lines = [
        heading("Hot path: one QueuePool checkout+checkin (SQLite file, pool_size=5)"),
        f"{config.rounds} interleaved rounds x {config.ops} ops (after {config.warmup} warm-up"
        " ops), GC enabled; added = median of per-round paired differences",
        table(["variant", "median µs", "IQR µs", "added over bare"], rows),
        "",
        *_verdicts(result, bare),
    ]
    return "\n".join(lines)


def _added_cell(result: HotPathResult, name: str, bare: float) -> str:
    if name == "bare":
        return "-"
    added = result.added[name].median
    return f"{added:+.2f} µs ({added / bare * 100:+.1f}%)"


def _verdicts(result: HotPathResult, bare: float) -> list[str]:
    pw = result.added["poolwatch"].median
    pct = pw / bare * 100
    lines = [
        f"poolwatch adds {pw:.2f} µs per checkout+checkin "
        f"(target <= {TARGET_ADDED_US:.0f} µs): {verdict(pw <= TARGET_ADDED_US)}",
        f"poolwatch adds {pct:.1f}% over bare (target <= {TARGET_ADDED_PCT:.0f}%): "
        f"{verdict(pct <= TARGET_ADDED_PCT)}",
    ]
    if "contrib" in result.added:
        contrib = result.added["contrib"].median
        ratio = contrib / pw if pw > 0 else float("inf")
        lines += [
            f"contrib adds {contrib:.2f} µs; contrib-added / poolwatch-added = {ratio:.1f}x "
            f"(target >= {TARGET_RATIO:.0f}x): {verdict(ratio >= TARGET_RATIO)}",
        ]
    else:
        lines.append(f"contrib variant skipped: {result.contrib_refusal}")
    return lines


# -- the deferred side: Ledger.drain() / snapshot() at collection time ----------------------

DRAIN_SIZES = (1, 100, 10_000)
"""Pending values per list (a wait and a use per checkout; below DRAIN_AT)."""


def _durations(count: int) -> list[float]:
    """Log-uniform durations from 1 µs to 1 s: they land across all buckets."""
    rng = random.Random(20241122)
    return [10 ** rng.uniform(-6, 0) for _ in range(count)]


def _filled(waits: list[float], uses: list[float]) -> Ledger:
    ledger = Ledger()
    ledger.waits.extend(waits)
    ledger.uses.extend(uses)
    return ledger


def _time_ledgers(pending: int, operation: str, values: list[float]) -> float:
    """Nanoseconds per pending observation for ``operation`` over a batch of ledgers."""
    batch = max(5, 5000 // pending)
    waits, uses = values[:pending], values[pending : 2 * pending]
    ledgers = [_filled(waits, uses) for _ in range(batch)]
    calls = [getattr(ledger, operation) for ledger in ledgers]
    start = perf_counter()
    for call in calls:
        call()
    elapsed = perf_counter() - start
    return elapsed / (batch * 2 * pending) * 1e9


@dataclass(frozen=True)
class DrainResult:
    """ns per pending observation, by (operation, pending values per list)."""

    ns_per_observation: dict[tuple[str, int], Summary]


def run_drain(config: HotPathConfig) -> DrainResult:
    """Time drain() and snapshot() for each size, all interleaved round by round."""
    values = _durations(2 * max(DRAIN_SIZES))
    runs: dict[str, Callable[[], float]] = {}
    for operation in ("drain", "snapshot"):
        for pending in DRAIN_SIZES:
            runs[f"{operation}:{pending}"] = _bind_ledger(pending, operation, values)
    for run in runs.values():
        run()  # warm-up
    samples = interleave(runs, config.drain_rounds)
    out: dict[tuple[str, int], Summary] = {}
    for key, values_ns in samples.items():
        name, size = key.split(":")
        out[(name, int(size))] = summarize(values_ns)
    return DrainResult(out)


def _bind_ledger(pending: int, operation: str, values: list[float]) -> Callable[[], float]:
    return lambda: _time_ledgers(pending, operation, values)


def render_drain(result: DrainResult, hot: HotPathResult | None, config: HotPathConfig) -> str:
    """The deferred-cost table."""
    rows = []
    for pending in DRAIN_SIZES:
        row = [f"{pending:,} wait + {pending:,} use"]
        for operation in ("drain", "snapshot"):
            ns = result.ns_per_observation[(operation, pending)].median
            row += [f"{ns * 2 * pending / 1000:.2f}", f"{ns:.0f}"]
        rows.append(row)
    big = result.ns_per_observation[("drain", max(DRAIN_SIZES))].median
    lines = [
        heading("Deferred to collection: Ledger.drain() / Ledger.snapshot()"),
        f"{config.drain_rounds} interleaved rounds; GC enabled; each checkout leaves 2 pending "
        "observations (one wait, one use)",
        table(
            ["pending values", "drain µs", "ns/obs", "snapshot µs", "ns/obs"],
            rows,
        ),
        f"at {max(DRAIN_SIZES):,} pending per list, the exporter thread spends "
        f"{2 * big / 1000:.3f} µs per checkout bucketing what the hot path deferred",
    ]
    if hot is not None:
        pw = hot.added["poolwatch"].median
        lines.append(
            f"(the application thread pays {pw:.2f} µs per checkout; "
            "snapshot also copies every histogram, a fixed cost per series)"
        )
    return "\n".join(lines)
