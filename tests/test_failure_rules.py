"""DESIGN.md's failure rules: never raise into the app, survive fork, hold pools weakly, cap."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import weakref
from pathlib import Path

import pytest
import sqlalchemy as sa
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricExportResult,
    MetricsData,
    PeriodicExportingMetricReader,
)

import poolwatch
from poolwatch import _registry
from poolwatch._export import Producer
from poolwatch._ledger import DRAIN_AT, Ledger
from poolwatch.adapters.sqlalchemy import SQLAlchemyAdapter
from tests.support.harness import Harness


class _BrokenExporter(MetricExporter):
    """An exporter whose backend is down: every export raises."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: object
    ) -> MetricExportResult:
        self.calls += 1
        raise ConnectionRefusedError("collector is down")

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: object) -> None:
        return None


def test_a_failing_exporter_costs_the_application_nothing(tmp_path: Path) -> None:
    exporter = _BrokenExporter()
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=20)
    provider = MeterProvider(metric_readers=[reader])
    poolwatch.instrument(meter_provider=provider)
    try:
        engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
        for _ in range(200):
            with engine.connect() as conn:
                assert conn.execute(sa.text("select 1")).scalar() == 1
        provider.force_flush()
        assert exporter.calls >= 1
        assert [s.checkouts for s in poolwatch.pools()] == [200]
    finally:
        poolwatch.uninstrument()
        provider.shutdown()


def test_a_fault_in_the_producer_leaves_other_metrics_and_the_app_alone(
    pw: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Producer, out: object, reading: object) -> None:
        raise RuntimeError("injected producer fault")

    monkeypatch.setattr(Producer, "_add", broken)
    app_counter = pw.provider.get_meter("app").create_counter("app.requests")
    app_counter.add(1)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    engine.connect().close()
    with caplog.at_level(logging.WARNING, logger="poolwatch"):
        data = pw.reader.get_metrics_data()
        pw.reader.get_metrics_data()
    assert data is not None
    scopes = [s.scope.name for rm in data.resource_metrics for s in rm.scope_metrics]
    assert scopes == ["app"]
    assert pw.handle is not None and pw.handle.errors == {"export": 2}
    assert len([r for r in caplog.records if "internal error in export" in r.message]) == 1
    engine.connect().close()


def test_a_fault_reading_levels_is_contained(
    pw: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: SQLAlchemyAdapter, pool: object) -> object:
        raise AttributeError("pool internals changed")

    monkeypatch.setattr(SQLAlchemyAdapter, "levels", broken)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    engine.connect().close()
    got = pw.collect()
    assert got.count("poolwatch.wait.duration", outcome="acquired") == 1
    assert got.value("poolwatch.connections", state="used") == 0
    assert pw.handle is not None and pw.handle.errors == {"sqlalchemy levels": 1}


def test_a_fault_on_the_hot_path_never_reaches_the_caller(
    harness: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = harness.instrument(leak_threshold=0.000001)
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")

    def broken(self: Ledger, key: object, held: float) -> None:
        raise RuntimeError("injected hot-path fault")

    monkeypatch.setattr(Ledger, "settle", broken)
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    assert handle.errors == {"sqlalchemy checkin": 3}


def test_an_adapter_that_cannot_hook_is_undone_and_reported(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SQLAlchemyAdapter.instrument

    def half_then_fail(self: SQLAlchemyAdapter, *, imported_before: bool) -> None:
        original(self, imported_before=imported_before)
        raise RuntimeError("unsupported SQLAlchemy")

    monkeypatch.setattr(SQLAlchemyAdapter, "instrument", half_then_fail)
    handle = harness.instrument()
    assert "sqlalchemy" not in handle.libraries
    assert handle.errors == {"sqlalchemy instrument": 1}
    from sqlalchemy.pool import base

    assert not hasattr(base.Pool, "_poolwatch_ledger")
    sa.create_engine("sqlite://").connect().close()


def test_a_forked_child_records_its_own_pools(pw: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    for _ in range(5):
        engine.connect().close()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it sees, then leave without running pytest's exit
        try:
            engine.dispose(close=False)
            for _ in range(3):
                engine.connect().close()
            janitors = [t.name for t in threading.enumerate() if t.name == "poolwatch-janitor"]
            payload = json.dumps([[[s.name, s.checkouts] for s in poolwatch.pools()], janitors])
            os.write(write, payload.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)
    assert child == [[[f"sqlite:///{tmp_path}/x.db", 3]], ["poolwatch-janitor"]]
    assert [s.checkouts for s in poolwatch.pools()] == [5]


def test_pools_are_tracked_weakly(
    pw: Harness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    engine.connect().close()
    assert len(poolwatch.pools()) == 1
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None  # poolwatch kept nothing of it alive
    # Its series outlives it (RETENTION), nothing open, its counters as they were.
    assert [(s.instances, s.used, s.idle, s.checkouts) for s in poolwatch.pools()] == [(0, 0, 0, 1)]
    assert pw.collect().value("poolwatch.connections", state="idle") == 0
    monkeypatch.setattr(_registry, "RETENTION", 0.0)
    assert [s.checkouts for s in poolwatch.pools()] == [1]  # read one last time ...
    assert poolwatch.pools() == []  # ... then removed
    assert pw.collect().names() == set()


def test_a_pool_dropped_while_a_round_is_exported_is_freed_at_once(
    pw: Harness, tmp_path: Path
) -> None:
    """A round's readings outlive the read (an exporter turns them into points, while the
    application runs on): they hold the pools weakly, so that a pool dropped meanwhile is
    freed as it would be without poolwatch (asyncpg's own test_pool_gc_does_not_restore_
    min_size caught a round in flight keeping one alive)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    engine.connect().close()
    handle = pw.handle
    assert handle is not None
    collection = handle._collector.collect(observe=True)  # a round, held as an exporter would
    assert [r.instances for r in collection.readings] == [1]
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None
    assert [pool() for pool in collection.readings[0].pools] == [None]


def test_without_a_reader_a_gone_pool_is_removed_after_retention(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    poolwatch.instrument()
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    engine.connect().close()
    del engine
    gc.collect()
    assert [s.instances for s in poolwatch.pools()] == [0]
    assert [s.instances for s in poolwatch.pools()] == [0]
    monkeypatch.setattr(_registry, "RETENTION", 0.0)
    assert [s.instances for s in poolwatch.pools()] == [0]
    assert poolwatch.pools() == []


def test_ten_thousand_engines_created_and_dropped_leave_no_growth(pw: Harness) -> None:
    """Made at one place, they are one series with many instances: nothing grows."""

    def churn(count: int) -> None:
        for _ in range(count):
            engine = sa.create_engine("sqlite://")
            engine.connect().close()
            engine.dispose()
        gc.collect()
        pw.collect()
        # Closes appended while that collection ran (its garbage collections finalise
        # engines) wait for the next fold: they are pending, not kept.
        pw.collect()

    churn(500)  # warm caches (SQLAlchemy's and ours)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    churn(10_000)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    # The package's own files only: a checkout named poolwatch holds the tests and, on CI,
    # the virtualenv (SQLAlchemy's allocations matched "*/poolwatch/*" there).
    package = tracemalloc.Filter(True, str(Path(poolwatch.__file__).parent / "*"))
    ours = after.filter_traces([package])
    ours_before = before.filter_traces([package])
    growth = sum(s.size for s in ours.statistics("filename")) - sum(
        s.size for s in ours_before.statistics("filename")
    )
    assert growth < 64 * 1024, f"poolwatch memory grew by {growth} bytes"
    gc.collect()
    [snap] = poolwatch.pools()
    # Two pool instances an engine: its own, and the one dispose() puts in its place.
    assert (snap.instances, snap.instances_created, snap.checkouts) == (0, 21_000, 10_500)


def test_series_past_the_cap_fold_into_an_overflow_series(
    harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    harness.instrument(max_pools=2)
    with caplog.at_level(logging.WARNING, logger="poolwatch"):
        engines = [sa.create_engine(f"sqlite:///{tmp_path}/db{i}.db") for i in range(5)]
    for engine in engines:
        engine.connect().close()
    snaps = {s.name: s for s in poolwatch.pools()}
    assert sorted(snaps) == [
        "_overflow",
        f"sqlite:///{tmp_path}/db0.db",
        f"sqlite:///{tmp_path}/db1.db",
    ]
    assert (snaps["_overflow"].instances, snaps["_overflow"].checkouts) == (3, 3)
    warnings = [r.message for r in caplog.records if "max_pools" in r.message]
    assert warnings == [
        f"poolwatch: more than 2 pool series (max_pools); further pools, starting with "
        f"sqlalchemy 'sqlite:///{tmp_path}/db2.db', are folded into the '_overflow' series"
    ]
    assert (
        harness.collect().value("poolwatch.connections", pool__name="_overflow", state="idle") == 3
    )


def _janitors() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "poolwatch-janitor"]


def test_the_janitor_runs_while_instrumented(harness: Harness) -> None:
    harness.instrument()
    assert len(_janitors()) == 1
    poolwatch.uninstrument()
    assert _janitors() == []


def test_pending_values_stay_bounded_without_any_collection(pw: Harness, tmp_path: Path) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path}/x.db")
    ledger = engine.pool._poolwatch_ledger
    for _ in range(DRAIN_AT + 100):  # about 0.2 s of checkouts, and no reader collects
        engine.pool.connect().close()
    deadline = time.monotonic() + 5
    while len(ledger.uses) > DRAIN_AT:  # the janitor runs once a second
        assert time.monotonic() < deadline, "the janitor did not fold the pending values"
        time.sleep(0.05)
    assert [s.checkouts for s in poolwatch.pools()] == [DRAIN_AT + 100]


def test_only_installed_libraries_are_watched_and_the_finder_leaves_when_done() -> None:
    """While poolwatch's finder is on sys.meta_path every import consults it; it is there
    only for libraries that are installed and not imported yet."""
    script = textwrap.dedent(
        """
        import sys
        from opentelemetry.sdk.metrics import MeterProvider
        import poolwatch
        from poolwatch._imports import PostImportHooks
        from poolwatch.adapters import AiohttpAdapter

        AiohttpAdapter.module = "no_such_library_for_poolwatch"  # as if aiohttp were absent
        import httpx, urllib3  # imported before: hooked at once
        handle = poolwatch.instrument(meter_provider=MeterProvider())
        [finder] = [f for f in sys.meta_path if isinstance(f, PostImportHooks)]
        print(sorted(finder._hooks))
        import sqlalchemy
        print(sorted(finder._hooks))
        import asyncpg, psycopg_pool, redis
        print(sorted(handle.libraries))
        print([f for f in sys.meta_path if isinstance(f, PostImportHooks)])
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "['asyncpg', 'psycopg_pool', 'redis', 'sqlalchemy']",
        "['asyncpg', 'psycopg_pool', 'redis']",
        "['asyncpg', 'httpx', 'psycopg_pool', 'redis', 'sqlalchemy', 'urllib3']",
        "[]",
    ]


def test_poolwatchs_thread_works_with_the_garbage_collector_off() -> None:
    """The janitor's rounds run the cyclic garbage collector off, so that the application's
    finalizers run on its own threads; an application that turned it off keeps it off."""
    from poolwatch._safe import garbage_collector_off

    assert gc.isenabled()
    with garbage_collector_off():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with garbage_collector_off():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the application's choice stands
    finally:
        gc.enable()


def test_the_heap_walk_judges_each_type_once_and_survives_odd_classes() -> None:
    """Pools made before instrument() are found by one pass over the heap that judges each
    type once; a class that cannot be hashed, or whose subclass check raises, is skipped."""
    from poolwatch.adapters._base import heap_objects

    class Unhashable(type):
        __hash__ = None  # type: ignore[assignment]

    class Odd(metaclass=Unhashable):
        pass

    class Wanted:
        pass

    odd, wanted = [Odd() for _ in range(3)], [Wanted() for _ in range(3)]
    judged: list[type] = []

    def select(cls: type) -> bool:
        judged.append(cls)
        if cls is Odd:
            raise RuntimeError("a metaclass's check failing")
        return cls is Wanted

    found = heap_objects(select)
    assert {id(obj) for obj in found if isinstance(obj, Wanted)} == {id(obj) for obj in wanted}
    assert not any(isinstance(obj, Odd) for obj in found)
    assert judged.count(Wanted) == 1  # once per type, not per object
    assert judged.count(Odd) == len(odd)  # unhashable: judged each time, never fatal
