"""The process view: descriptors against the limit, TCP connections by state and owner.

Real sockets only: the session's PostgreSQL, loopback HTTP upstreams in this process (so
their accepted sockets are this process's inbound connections), raw client sockets that
no pool owns, and psutil reading the real /proc.
"""

from __future__ import annotations

import http.client
import os
import re
import resource
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import requests
import sqlalchemy as sa

import poolwatch
from poolwatch._safe import ErrorLog
from poolwatch.diagnostics import process as _process
from tests.support.harness import Harness
from tests.support.postgres import PostgresCluster
from tests.support.upstream import ThreadedUpstream

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parent.parent


def _groups(view: poolwatch.ProcessView) -> set[tuple[str, str, int, str | None, int | None]]:
    return {(g.state, g.owner, g.count, g.address, g.port) for g in view.connections}


@pytest.fixture
def pw(harness: Harness) -> Harness:
    harness.instrument(process_view="on")
    return harness


def test_connections_are_told_apart_by_owner(pw: Harness, postgres: PostgresCluster) -> None:
    engine = sa.create_engine(postgres.url())
    with (
        ThreadedUpstream() as upstream,
        requests.Session() as session,
        httpx.Client(base_url=upstream.url) as client,
    ):
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        session.get(upstream.url, timeout=5)
        client.get("/")
        raw = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=5)
        raw.request("GET", "/")  # a client poolwatch does not know
        assert raw.getresponse().read() == b"ok\n"
        view = poolwatch.process_view()
        assert view is not None
        assert view.pid == os.getpid()
        # the database, the requests and the httpx connections are their pools'; the raw
        # one is untracked; the upstream runs here, so it accepted three: inbound
        assert _groups(view) == {
            ("established", "pool", 1, "127.0.0.1", postgres.port),
            ("established", "pool", 2, "127.0.0.1", upstream.port),  # requests and httpx
            ("established", "inbound", 3, None, None),
            ("established", "untracked", 1, "127.0.0.1", upstream.port),
        }
        assert (view.count("pool"), view.untracked, view.count(state="established")) == (3, 1, 7)
        assert view.file_descriptors_max == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert view.file_descriptors is not None
        assert abs(view.file_descriptors - len(os.listdir("/proc/self/fd"))) <= 1
        got = pw.collect()  # the reading just taken is what collections export
        assert got.value("poolwatch.process.file_descriptors") == view.file_descriptors
        assert got.value("poolwatch.process.file_descriptors.max") == view.file_descriptors_max
        assert (
            got.value(
                "poolwatch.process.connections",
                network__connection__state="established",
                owner="untracked",
                server__port=upstream.port,
            )
            == 1
        )
        assert (
            got.value("poolwatch.process.connections", owner="pool", server__port=upstream.port)
            == 2
        )
        assert got.value("poolwatch.process.connections", owner="inbound") == 3
        assert re.fullmatch(
            r"<ProcessView pid \d+ \[file descriptors \d+ of \d+ \| tcp: pool 3, "
            r"untracked 1, inbound 3\]>",
            repr(view),
        )
        raw.close()
        session.close()
        view = poolwatch.process_view()
        assert view is not None
        assert (view.count("pool"), view.untracked) == (2, 0)
    engine.dispose()


@contextmanager
def _listeners(count: int) -> Iterator[list[socket.socket]]:
    """``count`` listening sockets on loopback that never accept (their clients' sockets
    are connected all the same: the kernel completes the handshake into the backlog)."""
    with ExitStack() as stack:
        found = []
        for _ in range(count):
            listener = socket.create_server(("127.0.0.1", 0), backlog=4)
            stack.callback(listener.close)
            found.append(listener)
        yield found


def test_untracked_endpoints_are_bounded(pw: Harness) -> None:
    extra = 3
    with _listeners(_process.ENDPOINTS_KEPT + extra) as listeners, ExitStack() as stack:
        ports = [listener.getsockname()[1] for listener in listeners]
        for i, port in enumerate(ports):
            for _ in range(2 if i < _process.ENDPOINTS_KEPT else 1):  # the first ones busier
                client = socket.create_connection(("127.0.0.1", port), timeout=5)
                stack.callback(client.close)
        view = poolwatch.process_view()
        assert view is not None
        untracked = [g for g in view.connections if g.owner == "untracked"]
        named = {(g.address, g.port): g.count for g in untracked if g.address != _process.OTHER}
        assert named == {("127.0.0.1", port): 2 for port in ports[: _process.ENDPOINTS_KEPT]}
        assert [(g.state, g.count, g.port) for g in untracked if g.address == "_other"] == [
            ("established", extra, None)
        ]
        assert view.untracked == 2 * _process.ENDPOINTS_KEPT + extra


def test_poolwatchs_thread_refreshes_the_view_for_collections(harness: Harness) -> None:
    harness.instrument(process_view="auto")
    with ThreadedUpstream() as upstream:
        raw = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=5)
        try:
            raw.request("GET", "/")
            raw.getresponse().read()
            # The janitor's first round is after one second; a loaded machine (a CI run
            # beside other jobs) took more than 5.
            deadline = time.monotonic() + 30
            while not harness.collect().points("poolwatch.process.connections", owner="untracked"):
                assert time.monotonic() < deadline, "the process view was never refreshed"
                time.sleep(0.05)
        finally:
            raw.close()


def test_a_reading_that_ends_last_but_began_first_is_not_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """poolwatch's thread and process_view() read at once; the older reading finishing
    last must not replace the newer one in what collections export."""
    real_read = _process.read
    first_read, newer_kept = threading.Event(), threading.Event()
    older: list[poolwatch.ProcessView] = []

    def read(pool_sockets: set[int], psutil: object) -> poolwatch.ProcessView:
        view = real_read(pool_sockets, psutil)
        if not first_read.is_set():  # the slow reading: ends after the next one
            first_read.set()
            assert newer_kept.wait(10)
        return view

    monkeypatch.setattr(_process, "read", read)
    watcher = _process.ProcessWatcher(set, ErrorLog())
    slow = threading.Thread(target=lambda: older.append(watcher.refresh()))  # type: ignore[arg-type]
    slow.start()
    assert first_read.wait(10)
    with _listeners(1) as (listener,):
        client = socket.create_connection(listener.getsockname(), timeout=5)
        try:
            newer = watcher.refresh()
            newer_kept.set()
            slow.join(10)
        finally:
            client.close()
    assert newer is not None and older[0] is not None
    assert newer.untracked == older[0].untracked + 1
    assert watcher.latest is newer


def test_prometheus_renders_the_process_view_names() -> None:
    handle = poolwatch.instrument(prometheus_port=0)
    try:
        assert handle.prometheus_address is not None
        host, port = handle.prometheus_address
        with ThreadedUpstream() as upstream:
            raw = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=5)
            raw.request("GET", "/")
            raw.getresponse().read()
            poolwatch.process_view()
            body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read()
            raw.close()
    finally:
        poolwatch.uninstrument()
    text = body.decode()
    names = set(re.findall(r"^(poolwatch_process_[a-z_]+)[{ ]", text, re.M))
    assert names == {
        "poolwatch_process_file_descriptors",
        "poolwatch_process_file_descriptors_max",
        "poolwatch_process_connections",
    }
    assert re.search(
        r'^poolwatch_process_connections\{network_connection_state="established",'
        r'otel_scope_name="poolwatch",[^}]*owner="untracked",'
        rf'server_address="127.0.0.1",server_port="{upstream.port}"\}} 1\.0$',
        text,
        re.M,
    ), text


def test_off_means_no_view_and_no_points(harness: Harness) -> None:
    harness.instrument(process_view="off")
    assert poolwatch.process_view() is None
    assert not {n for n in harness.collect().names() if n.startswith("poolwatch.process.")}


def _without_psutil(tmp_path: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a Python where ``import psutil`` fails (a module of that name first
    on the path raises ImportError, as an absent package would)."""
    (tmp_path / "psutil.py").write_text("raise ImportError(\"No module named 'psutil'\")\n")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_without_psutil_auto_is_off_and_on_says_what_to_install(tmp_path: Path) -> None:
    auto = _without_psutil(
        tmp_path,
        """
        from opentelemetry.sdk.metrics import MeterProvider
        import poolwatch
        poolwatch.instrument(meter_provider=MeterProvider())
        print(poolwatch.process_view())
        """,
    )
    assert (auto.returncode, auto.stdout, auto.stderr) == (0, "None\n", "")
    on = _without_psutil(
        tmp_path,
        """
        import poolwatch
        try:
            poolwatch.instrument(process_view="on")
        except poolwatch.ConfigError as error:
            print(error)
        """,
    )
    assert on.stdout == (
        "poolwatch setting 'process_view' (argument) got 'on': expected 'auto', 'on' (needs "
        "psutil: pip install 'poolwatch[process]') or 'off'\n"
    )


def test_a_forked_child_reads_its_own_process(pw: Harness) -> None:
    parent = poolwatch.process_view()
    assert parent is not None and parent.pid == os.getpid()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the pid its view names, then leave at once
        try:
            view = poolwatch.process_view()
            os.write(write, str(view.pid if view else -1).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child_pid = int(pipe.read())
    os.waitpid(pid, 0)
    assert child_pid == pid
