"""Memory per tracked pool: Python allocations of 1,000 engines with and without poolwatch.

Each measurement warms SQLAlchemy (and poolwatch, when instrumented) up on a few engines,
starts ``tracemalloc``, creates the engines (in-memory SQLite, ``QueuePool``), checks each
out and in once, runs one collection (so poolwatch's per-reader export state is included
and its pending values are drained, as in steady state), runs the garbage collector and
reads the memory still allocated since the start. Variants, interleaved round by round:

* ``bare`` — no poolwatch;
* ``poolwatch, one call site`` — the engines share one series (many pool instances);
* ``poolwatch, distinct names`` — one series per engine (``poolwatch.track(name=...)``).

The bytes per pool attributable to poolwatch are (variant - bare) / engines. tracemalloc
sees every allocation made through Python's allocators, which is all of poolwatch's memory;
SQLite's own C allocations are the same in every variant and are not counted.
"""

from __future__ import annotations

import gc
import logging
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from _common import Summary, heading, interleave, summarize, table
from bench_collect import dispose_all, engines_named, engines_one_site
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import poolwatch

BARE = "bare"
ONE_SITE = "poolwatch, one call site"
NAMED = "poolwatch, distinct names"


@dataclass(frozen=True)
class MemoryConfig:
    """How much to measure."""

    engines: int = 1000
    rounds: int = 3
    warmup: int = 20


def _build(variant: str, count: int) -> list[Any]:
    if variant == NAMED:
        return engines_named(count)
    return engines_one_site(count)


def allocated(variant: str, config: MemoryConfig) -> float:
    """Bytes still allocated after building ``config.engines`` engines in ``variant``."""
    gc.collect()  # or instrument()'s heap walk finds unreachable engines of a previous round
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    if variant != BARE:
        # A thousand engines made at one line, checked out once each, are a client per
        # request to poolwatch, which says so once per round; the figures need no log.
        logging.getLogger("poolwatch").setLevel(logging.ERROR)
        poolwatch.instrument(meter_provider=provider, max_pools=20_000, process_view="off")
    engines: list[Any] = []
    try:
        dispose_all(_build(variant, config.warmup))
        reader.get_metrics_data()
        gc.collect()
        tracemalloc.start()
        engines = _build(variant, config.engines)
        reader.get_metrics_data()
        gc.collect()
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        dispose_all(engines)
        poolwatch.uninstrument()
        provider.shutdown()
        gc.collect()
    return float(current)


@dataclass(frozen=True)
class MemoryResult:
    """Bytes allocated per variant (medians over rounds)."""

    config: MemoryConfig
    allocated: dict[str, Summary]


def run_memory(config: MemoryConfig) -> MemoryResult:
    """All variants, interleaved round by round."""
    runs: dict[str, Callable[[], float]] = {
        name: _bind(name, config) for name in (BARE, ONE_SITE, NAMED)
    }
    samples = interleave(runs, config.rounds)
    return MemoryResult(config, {name: summarize(v) for name, v in samples.items()})


def _bind(variant: str, config: MemoryConfig) -> Callable[[], float]:
    return lambda: allocated(variant, config)


def render_memory(result: MemoryResult) -> str:
    """The memory table."""
    n = result.config.engines
    bare = result.allocated[BARE].median
    rows = []
    for name, summary in result.allocated.items():
        extra = "-" if name == BARE else f"{(summary.median - bare) / n:,.0f}"
        rows.append([name, f"{summary.median / 1e6:.2f}", f"{summary.median / n:,.0f}", extra])
    return "\n".join(
        [
            heading(f"Memory: tracemalloc of {n:,} engines, each checked out once"),
            f"medians of {result.config.rounds} interleaved rounds, after one collection and "
            "gc.collect()",
            table(["variant", "MB", "bytes/engine", "poolwatch bytes/pool"], rows),
        ]
    )
