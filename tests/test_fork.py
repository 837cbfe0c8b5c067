"""Forked children: a child forked to exec (``subprocess`` with a ``preexec_fn``) sets
nothing up before its ``exec``; a prefork worker that only uses its parent's pools still
gets its own thread and provider, and exports as itself.

Real forks: ``subprocess`` with a ``preexec_fn`` reports what the child holds between fork
and exec through a pipe; the worker exports over OTLP/HTTP to a loopback receiver.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

import poolwatch
from poolwatch import _api
from tests.support.otlp import Receiver, receiver


@pytest.fixture
def exporting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """poolwatch with a provider of its own, exporting over OTLP every 0.1 s."""
    with receiver() as (kept, port):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "100")
        monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
        poolwatch.instrument(process_view="off")
        try:
            yield kept
        finally:
            poolwatch.uninstrument()


def _between_fork_and_exec(look: Callable[[], object]) -> object:
    """What ``look()`` returns in a child of ``subprocess`` run between fork and exec."""
    read, write = os.pipe()

    def preexec() -> None:
        os.write(write, json.dumps(look()).encode())

    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=preexec, check=True, timeout=60)
    finally:
        os.close(write)
    with os.fdopen(read) as pipe:
        return json.loads(pipe.read())


def _state() -> dict[str, object]:
    current = _api._current
    assert current is not None
    return {
        "threads": sorted(t.name for t in threading.enumerate()),
        "provider": id(current.meter_provider),
        # the SDK's own fork handler detects a provider's resource again, on a thread pool
        "resource": id(current.meter_provider._sdk_config.resource),
    }


def test_a_child_forked_to_exec_sets_nothing_up(exporting: Receiver, tmp_path: Path) -> None:
    """No thread started, no provider built and no resource detected in the child before
    its exec (before: the janitor, the SDK's restarted reader thread, a whole provider and
    the SDK's detection of the parent provider's resource, every spawn)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path}/spawn.db")
    for _ in range(3):
        engine.connect().close()
    parent = _state()
    child = _between_fork_and_exec(_state)
    assert child == {**parent, "threads": [threading.current_thread().name]}


def test_a_child_forked_to_exec_is_set_up_when_it_asks(exporting: Receiver, tmp_path: Path) -> None:
    """The set-up left for later happens at the first call that needs it: pools() in the
    preexec_fn sees the child's own counts (zero), its own thread and provider."""
    name = f"sqlite:///{tmp_path}/spawn.db"
    engine = sa.create_engine(name)
    for _ in range(3):
        engine.connect().close()
    parent = _state()

    def look() -> object:
        checkouts = [p.checkouts for p in poolwatch.pools() if p.name == name]
        return {"checkouts": checkouts, **_state()}

    child = _between_fork_and_exec(look)
    assert isinstance(child, dict)
    assert child["checkouts"] == [0]
    assert child["provider"] != parent["provider"]
    assert child["threads"] == sorted(
        [threading.current_thread().name, "OtelPeriodicExportingMetricReader", "poolwatch-janitor"]
    )
    assert [p.checkouts for p in poolwatch.pools() if p.name == name] == [3]  # untouched


def test_a_worker_using_its_parents_pool_exports_as_itself(
    exporting: Receiver, tmp_path: Path
) -> None:
    """A prefork worker (gunicorn --preload, Celery prefork) that never creates a pool of its
    own: its checkouts on the parent's pool are exported under its own pid and instance id,
    by its own provider, with its own janitor."""
    name = f"sqlite:///{tmp_path}/worker.db"
    engine = sa.create_engine(name, poolclass=NullPool)  # no connection kept across the fork
    for _ in range(5):
        engine.connect().close()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: three checkouts, then wait to be exported (never returns)
        try:
            os.close(read)
            for _ in range(3):
                engine.connect().close()
            os.write(write, json.dumps(sorted(t.name for t in threading.enumerate())).encode())
            os.close(write)
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read) as pipe:
            threads = json.loads(pipe.read())
        deadline = time.monotonic() + 30  # exports come every 0.1 s: seconds at most
        mine: list[tuple[dict[str, str | int], dict[str, int]]] = []
        while not mine and time.monotonic() < deadline:
            time.sleep(0.05)
            mine = [(r, w) for r, w in exporting.exports() if r.get("process.pid") == pid]
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    parents = [r for r, _ in exporting.exports() if r.get("process.pid") == os.getpid()]
    assert mine, "the worker exported nothing"
    resource, waits = mine[0]
    assert waits[name] == 3  # (the exporter's own HTTP pool is there too, as any pool)
    assert resource["service.instance.id"] not in {r["service.instance.id"] for r in parents}
    # its own reader's thread, once: the parent's reader is not restarted in the child
    assert threads.count("OtelPeriodicExportingMetricReader") == 1
    assert "poolwatch-janitor" in threads
