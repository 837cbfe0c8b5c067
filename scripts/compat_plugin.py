"""pytest plugin for the compat run (scripts/compat.py): loaded with ``-p compat_plugin``.

In both modes it records each test's outcome. In the ``instrumented`` mode it also turns
poolwatch on as the interpreter starts — before pytest, the tests, their conftest files and
so the library under test are imported — with two in-memory
readers (cumulative and delta) collected every 20 ms by a thread of its own, and at the end
records what poolwatch hooked, its contained internal errors and what the collections saw.

Environment (set by scripts/compat.py):
  POOLWATCH_COMPAT_MODE     bare | instrumented
  POOLWATCH_COMPAT_OUT      where to write the JSON result
  POOLWATCH_COMPAT_IMPORTS  modules to import once pytest is configured, comma-separated
                            (httpcore's pools are hooked once httpx is imported)
  POOLWATCH_COMPAT_GUARD    1: refuse connects off loopback in-process (no namespace)
  POOLWATCH_COMPAT_ONLY     a file of node ids: run only those tests

It is imported at interpreter start-up by compat_site/sitecustomize.py (a library's pytest
configuration may import the library before any plugin loads), then registered by
``-p compat_plugin`` (PYTEST_DONT_REWRITE: it is imported before pytest could rewrite it).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import sys
import threading
import time
from typing import Any

import pytest

MODE = os.environ.get("POOLWATCH_COMPAT_MODE", "bare")
OUT = os.environ.get("POOLWATCH_COMPAT_OUT", "compat-result.json")
COLLECT_EVERY = 0.02
LIBRARIES = (
    "sqlalchemy",
    "urllib3",
    "requests",
    "botocore",
    "httpx",
    "httpcore",
    "aiohttp",
    "asyncpg",
)

# -- loopback only ---------------------------------------------------------------------------
# The libraries' suites include tests that connect to the Internet or to a non-routable
# address (to provoke a connect timeout). Nothing may leave this machine's loopback: the
# compat run puts each pytest process in a network namespace of its own with only loopback
# up. Where it cannot (no unshare), POOLWATCH_COMPAT_GUARD=1 and such a connect fails here
# at once with ENETUNREACH, in both modes alike.


def _off_loopback(address: Any) -> str | None:
    if not isinstance(address, tuple) or not address or not isinstance(address[0], str):
        return None  # a Unix socket or something not an IP endpoint
    host = address[0]
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None  # a name: the socket module resolves it before connecting
    return None if ip.is_loopback or ip.is_unspecified else host


_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex


def _guarded_connect(self: socket.socket, address: Any) -> None:
    host = _off_loopback(address)
    if host is not None:
        raise OSError(errno.ENETUNREACH, f"compat run: no traffic leaves loopback ({host})")
    _connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    if _off_loopback(address) is not None:
        return errno.ENETUNREACH
    return _connect_ex(self, address)


if os.environ.get("POOLWATCH_COMPAT_GUARD") == "1":
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign,assignment]


# -- poolwatch, instrumented mode ------------------------------------------------------------


class _Watch:
    """poolwatch on, with readers collected every 20 ms until the session ends."""

    def __init__(self) -> None:
        from opentelemetry.sdk.metrics import (
            Counter,
            Histogram,
            MeterProvider,
            ObservableCounter,
            ObservableGauge,
            ObservableUpDownCounter,
            UpDownCounter,
        )
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            InMemoryMetricReader,
        )

        import poolwatch

        self.imported_before = [name for name in LIBRARIES if name in sys.modules]
        delta = AggregationTemporality.DELTA
        self.cumulative = InMemoryMetricReader()
        self.delta = InMemoryMetricReader(
            preferred_temporality={
                kind: delta
                for kind in (
                    Counter,
                    UpDownCounter,
                    Histogram,
                    ObservableCounter,
                    ObservableUpDownCounter,
                    ObservableGauge,
                )
            }
        )
        self.provider = MeterProvider(metric_readers=[self.cumulative, self.delta])
        self.handle = poolwatch.instrument(meter_provider=self.provider)
        self.collections = 0
        self.collect_errors: list[str] = []
        self.kinds: set[str] = set()
        self.names: set[str] = set()
        self.points = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="compat-collector", daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        # With the cyclic garbage collector off: this thread is the harness's, and a
        # collection allocates; crossing the collector's threshold here would run the tests'
        # finalizers on it, at moments the bare run never sees — SQLAlchemy's asyncio suite
        # garbage-collects leaked connections and mappers on purpose, and a finalizer run
        # here, off its event loop, cascaded into 70 errors (2 runs in 6). An application's
        # own exporting thread allocates whether or not poolwatch is there.
        from poolwatch._safe import garbage_collector_off

        with garbage_collector_off():
            self._collect_readers()

    def _collect_readers(self) -> None:
        for reader in (self.cumulative, self.delta):
            try:
                data = reader.get_metrics_data()
            except Exception as error:  # recorded; the run fails on it
                if len(self.collect_errors) < 20:
                    self.collect_errors.append(f"{type(error).__name__}: {error}")
                continue
            self.collections += 1
            for resource in data.resource_metrics if data is not None else ():
                for scope in resource.scope_metrics:
                    if scope.scope.name != "poolwatch":
                        continue
                    for metric in scope.metrics:
                        for point in metric.data.data_points:
                            self.points += 1
                            attributes = point.attributes or {}
                            kind = attributes.get("pool.kind")
                            name = attributes.get("pool.name")
                            if isinstance(kind, str):
                                self.kinds.add(kind)
                            if isinstance(name, str) and len(self.names) < 10_000:
                                self.names.add(name)

    def _run(self) -> None:
        while not self._stop.wait(COLLECT_EVERY):
            self._collect()

    def finish(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=30)
        self._collect()
        import poolwatch

        result = {
            "imported_before": self.imported_before,
            "hooked": list(self.handle.libraries),
            "errors": self.handle.errors,
            "collections": self.collections,
            "collect_errors": self.collect_errors,
            "points": self.points,
            "kinds": sorted(self.kinds),
            "pool_names": len(self.names),
            "modules": {
                name: getattr(sys.modules[name], "__file__", None)
                for name in LIBRARIES
                if name in sys.modules
            },
        }
        poolwatch.uninstrument()
        return result


_watch = _Watch() if MODE == "instrumented" else None


def pytest_configure(config: pytest.Config) -> None:
    # Imported here, not at start-up: a module that is also a pytest plugin (anyio, which
    # httpx imports) must not be imported before pytest loads its plugins.
    if _watch is not None:
        for module in filter(None, os.environ.get("POOLWATCH_COMPAT_IMPORTS", "").split(",")):
            __import__(module)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A run again of some tests: the compat run names them in a file (node ids of classes
    # a plugin generates, as SQLAlchemy's does, cannot be given on the command line).
    only = os.environ.get("POOLWATCH_COMPAT_ONLY")
    if not only:
        return
    with open(only) as names:
        wanted = set(names.read().splitlines())
    keep = [item for item in items if _test_id(item.nodeid) in wanted]
    config.hook.pytest_deselected(
        items=[item for item in items if _test_id(item.nodeid) not in wanted]
    )
    items[:] = keep


# -- outcomes --------------------------------------------------------------------------------

_phases: dict[str, dict[str, str]] = {}
_started = time.monotonic()
_TREE = os.getcwd()


def _test_id(nodeid: str) -> str:
    """The node id with this copy's directory written ``<tree>``: the bare and the
    instrumented runs use copies in different places, and some parameter ids hold a path
    (requests' ``test_unzipped_paths_unchanged``)."""
    return nodeid.replace(_TREE, "<tree>")


def _phase_outcome(report: pytest.TestReport) -> str:
    if report.failed:
        return "failed"
    if report.skipped:
        return "xfailed" if hasattr(report, "wasxfail") else "skipped"
    return "xpassed" if hasattr(report, "wasxfail") else "passed"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    phases = _phases.setdefault(_test_id(report.nodeid), {})
    # A failed subtest (unittest's subTest, asyncpg's suite) reports its phase failed, and
    # the test's own report of that phase, passed, comes after it: the failure stands.
    if phases.get(report.when) != "failed":
        phases[report.when] = _phase_outcome(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _phases[f"{_test_id(report.nodeid)}::<collection>"] = {"collect": "failed"}


def _outcomes() -> dict[str, str]:
    """One outcome a test: failed if any phase failed, else its call's, else its setup's."""
    outcomes = {}
    for nodeid, phases in _phases.items():
        if "failed" in phases.values():
            outcomes[nodeid] = "failed"
        else:
            outcomes[nodeid] = phases.get("call") or phases.get("setup") or "passed"
    return outcomes


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    result: dict[str, Any] = {
        "mode": MODE,
        "exitstatus": int(exitstatus),
        "seconds": round(time.monotonic() - _started, 1),
        "outcomes": _outcomes(),
        "modules": {
            name: getattr(sys.modules[name], "__file__", None)
            for name in LIBRARIES
            if name in sys.modules
        },
    }
    if _watch is not None:
        result["poolwatch"] = _watch.finish()
    with open(OUT, "w") as out:
        json.dump(result, out, indent=1, sort_keys=True)
