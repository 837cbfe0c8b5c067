"""Shutdown is bounded: a collector that is down costs at most ``shutdown_timeout``, at
``uninstrument()`` and at interpreter exit; a healthy one still gets the last export.

The endpoints are real loopback sockets: a port nothing listens on (connections refused at
once, so the exporter retries with back-off) and a listener that accepts connections and
never answers (each attempt waits for its timeout). Exit is timed in a real subprocess.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader, PeriodicExportingMetricReader

import poolwatch
from poolwatch._config import DEFAULT_SHUTDOWN_TIMEOUT, resolve
from tests.support.otlp import Receiver, receiver

APP = textwrap.dedent(
    """
    import sys, time
    import sqlalchemy as sa
    import poolwatch

    poolwatch.instrument()
    engine = sa.create_engine("sqlite://")
    for _ in range(20):
        with engine.connect():
            pass
    time.sleep(float(sys.argv[2]))  # with a 0.1 s export interval: an export is under way
    if sys.argv[1] == "uninstrument":
        start = time.monotonic()
        poolwatch.uninstrument()
        print(f"uninstrument took {time.monotonic() - start:.3f}", flush=True)
    print("leaving", flush=True)
    """
)

TIMEOUT = 1.0
"""The bound the tests set (``POOLWATCH_SHUTDOWN_TIMEOUT``)."""
MARGIN = 3.0
"""Room for a loaded machine: thread starts, interpreter teardown. Without the bound these
endpoints cost 6 s and more (the exporter's 10 s deadline with back-off 1, 2, 4 s)."""


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback listener that accepts every connection and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for connection in held:
            connection.close()
        listener.close()


def _run_app(tmp_path: Path, port: int, how: str, *, pause: float, **env: str) -> dict[str, object]:
    """Run APP against ``http://127.0.0.1:port``; how long uninstrument() and exit took."""
    app = tmp_path / "app.py"
    app.write_text(APP)
    environment = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_METRIC_EXPORT_INTERVAL": "100",
        "POOLWATCH_SHUTDOWN_TIMEOUT": str(TIMEOUT),
        "POOLWATCH_PROCESS_VIEW": "off",
        **env,
    }
    environment.pop("OTEL_METRICS_EXPORTER", None)
    with subprocess.Popen(
        [sys.executable, str(app), how, str(pause)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        cwd=tmp_path,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        lines = []
        for line in process.stdout:
            lines.append(line.strip())
            if line.strip() == "leaving":
                break
        left = time.monotonic()
        try:
            process.wait(timeout=60)
        finally:
            process.kill()
        exit_took = time.monotonic() - left
        stderr = process.stderr.read()
    assert process.returncode == 0, stderr
    took = [float(line.split()[-1]) for line in lines if line.startswith("uninstrument took")]
    return {"uninstrument": took[0] if took else None, "exit": exit_took, "stderr": stderr}


ABANDONED = (
    f"poolwatch: the exporters did not finish within shutdown_timeout ({TIMEOUT:g} s); their "
    "last export is abandoned"
)


@pytest.mark.parametrize("endpoint", ["closed_port", "silent_port"])
def test_exit_waits_at_most_the_shutdown_timeout(
    endpoint: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port = request.getfixturevalue(endpoint)
    run = _run_app(tmp_path, port, "exit", pause=0.6)
    assert run["exit"] < TIMEOUT + MARGIN, run
    assert ABANDONED in str(run["stderr"])


@pytest.mark.parametrize("endpoint", ["closed_port", "silent_port"])
def test_uninstrument_waits_at_most_the_shutdown_timeout(
    endpoint: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port = request.getfixturevalue(endpoint)
    run = _run_app(tmp_path, port, "uninstrument", pause=0.6)
    assert run["uninstrument"] is not None
    assert float(str(run["uninstrument"])) < TIMEOUT + MARGIN, run
    assert run["exit"] < MARGIN, run  # nothing is left to wait for at exit
    assert ABANDONED in str(run["stderr"])


def test_a_timeout_of_zero_waits_for_nothing_and_says_nothing(
    closed_port: int, tmp_path: Path
) -> None:
    run = _run_app(tmp_path, closed_port, "exit", pause=0.6, POOLWATCH_SHUTDOWN_TIMEOUT="0")
    assert run["exit"] < MARGIN, run
    assert "shutdown_timeout" not in str(run["stderr"])


@pytest.fixture
def collector() -> Iterator[tuple[Receiver, int]]:
    with receiver() as (kept, port):
        yield kept, port


@pytest.mark.parametrize("how", ["exit", "uninstrument"])
def test_a_healthy_collector_gets_the_last_export(
    how: str, collector: tuple[Receiver, int], tmp_path: Path
) -> None:
    """With a 60 s interval nothing is exported while the program runs: only the last
    export, at uninstrument() or at exit, carries its 20 checkouts."""
    kept, port = collector
    run = _run_app(tmp_path, port, how, pause=0, OTEL_METRIC_EXPORT_INTERVAL="60000")
    assert [waits.get("sqlite://:memory:") for _, waits in kept.exports()] == [20]
    assert ABANDONED not in str(run["stderr"])


def test_the_applications_provider_is_neither_shut_down_nor_waited_for(
    silent_port: int,
) -> None:
    """Its reader exporting to a collector that never answers does not hold uninstrument(),
    and its other reader still works afterwards: the provider was left running."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    threads_before = set(threading.enumerate())
    # Stuck for 3 s an export: poolwatch waiting for it would hold uninstrument() that long.
    stuck = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"http://127.0.0.1:{silent_port}/v1/metrics", timeout=3),
        export_interval_millis=50,
    )
    memory = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[memory, stuck], shutdown_on_exit=False)
    provider.get_meter("app").create_counter("app.requests").add(1)
    poolwatch.instrument(meter_provider=provider, process_view="off", shutdown_timeout=5)
    time.sleep(0.3)  # the stuck reader's export is under way
    start = time.monotonic()
    poolwatch.uninstrument()
    took = time.monotonic() - start
    data = memory.get_metrics_data()
    assert data is not None
    names = [m.name for rm in data.resource_metrics for s in rm.scope_metrics for m in s.metrics]
    assert names == ["app.requests"]
    assert took < 1.0  # nothing of the application's is waited for (the bound here is 5 s)
    provider.shutdown(timeout_millis=100)  # the test's own provider, stopped by its owner
    # Its reader's thread ends with the stuck export: left running, its requests pool was
    # found by the next tests' instrument().
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(10)
        assert not thread.is_alive(), thread


def test_the_bound_is_a_setting() -> None:
    assert DEFAULT_SHUTDOWN_TIMEOUT == 2.0
    assert resolve({}, {}, ()).shutdown_timeout == 2.0
    assert resolve({}, {"POOLWATCH_SHUTDOWN_TIMEOUT": "0.5"}, ()).shutdown_timeout == 0.5
    assert resolve({"shutdown_timeout": 0}, {}, ()).shutdown_timeout == 0.0
